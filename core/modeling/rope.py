"""Rotary position embeddings in HF's rotate_half layout, with llama3 scaling and partial rotary."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


def rope_inv_freq(
    rotary_dim: int, theta: float, scaling: dict[str, Any] | None = None, device: torch.device | str | None = None
) -> torch.Tensor:
    """Inverse frequencies of ``rotary_dim`` channels, llama3-scaled when ``scaling`` says so (as HF computes them)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float, device=device) / rotary_dim))
    if scaling is None:
        return inv_freq
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    # Long wavelengths are divided by `factor`, short ones are kept, the band between is blended.
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
    return torch.where(is_medium, blended, scaled)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for every position as non-persistent buffers (no parameters: every pipeline stage has it)."""

    cos: torch.Tensor
    sin: torch.Tensor

    def __init__(self, rotary_dim: int, max_positions: int, theta: float, scaling: dict[str, Any] | None = None):
        super().__init__()
        self.rotary_dim, self.max_positions, self.theta, self.scaling = rotary_dim, max_positions, theta, scaling
        if torch.empty(0).is_meta:  # a meta build needs shapes only; arange on meta imports the compiler stack (~1.5 s)
            cos, sin = torch.empty(max_positions, rotary_dim), torch.empty(max_positions, rotary_dim)
        else:
            cos, sin = self._tables(device=None)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def _tables(self, device: torch.device | str | None) -> tuple[torch.Tensor, torch.Tensor]:
        positions = torch.arange(self.max_positions, dtype=torch.float, device=device)
        freqs = torch.outer(positions, rope_inv_freq(self.rotary_dim, self.theta, self.scaling, device))
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Recompute the tables in place (after ``to_empty`` left them uninitialised)."""
        cos, sin = self._tables(device=self.cos.device)
        self.cos.copy_(cos)
        self.sin.copy_(sin)

    def forward(self, position_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Whole tables ``[max_pos, rotary_dim]`` (attention slices them), or rows at ``position_ids``."""
        if position_ids is None:
            return self.cos, self.sin
        return self.cos[position_ids], self.sin[position_ids]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``[batch, seq, heads, head_dim]``; only the first ``cos.shape[-1]`` channels turn.

    ``cos``/``sin`` are ``[max_pos, rd]`` tables (sliced to the sequence) or per-token ``[batch, seq, rd]``.
    """
    seqlen = x.shape[1]
    if cos.dim() == 2:
        if seqlen > cos.shape[0]:
            raise ValueError(f"sequence length {seqlen} exceeds max_position_embeddings {cos.shape[0]}")
        cos, sin = cos[:seqlen], sin[:seqlen]
    # [.., seq, rd] -> [.., seq, 1, rd] broadcasts over heads; cast so bf16 activations stay bf16.
    cos, sin = cos.unsqueeze(-2).to(x.dtype), sin.unsqueeze(-2).to(x.dtype)
    rd = cos.shape[-1]
    if rd == x.shape[-1]:
        return x * cos + _rotate_half(x) * sin
    turned, kept = x[..., :rd], x[..., rd:]
    return torch.cat((turned * cos + _rotate_half(turned) * sin, kept), dim=-1)
