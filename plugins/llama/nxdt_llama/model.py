"""The Llama decoder on one device: RMSNorm, RoPE (llama3 scaling), GQA attention, SwiGLU.

Written to be parallelised from outside: tensor parallelism re-shards the Linear layers named in
``sharding.py``, so attention derives its head counts from tensor shapes, never from the config.
Pipeline parallelism deletes entries of ``layers`` and sets ``tok_embeddings``/``norm``/``output``
to None; ``forward`` then passes hidden states through.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

_ROPE_SCALING_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


@dataclass
class LlamaConfig:
    """Architecture of a Llama/Mistral decoder (defaults are those of HF ``LlamaConfig``)."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    num_layers: int = 32
    num_attention_heads: int = 32
    num_kv_heads: int | None = None  # None: one KV head per query head (MHA), as in HF and Megatron
    ffn_hidden_size: int = 11008
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    fuse_qkv: bool = False
    fuse_gate_up: bool = False
    init_std: float = 0.02
    attention_bias: bool = False
    mlp_bias: bool = False
    head_dim: int | None = None  # None: hidden_size // num_attention_heads

    def __post_init__(self) -> None:
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_attention_heads
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}"
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_kv_heads:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of num_kv_heads {self.num_kv_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for rotary embeddings")
        self.rope_scaling = normalize_rope_scaling(self.rope_scaling)


def normalize_rope_scaling(scaling: dict[str, Any] | None) -> dict[str, Any] | None:
    """Return llama3 rope scaling as a canonical dict, None for plain RoPE; reject other kinds."""
    if not scaling:
        return None
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return None
    if rope_type != "llama3":
        raise ValueError(
            f"rope scaling type {rope_type!r} is not supported by the llama family; use 'llama3'"
        )
    missing = [key for key in _ROPE_SCALING_KEYS if key not in scaling]
    if missing:
        raise ValueError(f"llama3 rope_scaling lacks {missing}")
    return {"rope_type": "llama3", **{key: scaling[key] for key in _ROPE_SCALING_KEYS}}


def rope_inv_freq(cfg: LlamaConfig, device: torch.device | str | None = None) -> torch.Tensor:
    """Inverse RoPE frequencies, with llama3 long-context scaling when configured (as HF computes them)."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float, device=device) / dim))
    if cfg.rope_scaling is None:
        return inv_freq
    s = cfg.rope_scaling
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    # Long wavelengths are divided by `factor`, short ones are kept, the band between is blended.
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
    return torch.where(is_medium, blended, scaled)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for every position, in the rotate_half layout (HF's), as non-persistent buffers."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.cfg = cfg
        cos, sin = self._tables(device=None)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def _tables(self, device: torch.device | str | None) -> tuple[torch.Tensor, torch.Tensor]:
        positions = torch.arange(self.cfg.max_position_embeddings, dtype=torch.float, device=device)
        freqs = torch.outer(positions, rope_inv_freq(self.cfg, device))
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Recompute the tables in place (after ``to_empty`` left them uninitialised)."""
        cos, sin = self._tables(device=self.cos.device)
        self.cos.copy_(cos)
        self.sin.copy_(sin)

    def forward(self, position_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Whole tables ``[max_pos, head_dim]`` (attention slices them), or rows at ``position_ids``."""
        if position_ids is None:
            return self.cos, self.sin
        return self.cos[position_ids], self.sin[position_ids]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_emb(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q, k ``[batch, seq, heads, head_dim]`` by cos/sin (``[max_pos, hd]`` or ``[batch, seq, hd]``)."""
    seqlen = q.shape[1]
    if cos.dim() == 2:
        if seqlen > cos.shape[0]:
            raise ValueError(f"sequence length {seqlen} exceeds max_position_embeddings {cos.shape[0]}")
        cos, sin = cos[:seqlen], sin[:seqlen]
    # [.., seq, hd] -> [.., seq, 1, hd] broadcasts over heads; cast so bf16 activations stay bf16.
    cos, sin = cos.unsqueeze(-2).to(q.dtype), sin.unsqueeze(-2).to(q.dtype)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def document_causal_mask(position_ids: torch.Tensor) -> torch.Tensor:
    """Boolean ``[batch, 1, seq, seq]`` mask: causal, and no attention across packed documents.

    A document starts wherever ``position_ids`` is 0, so its id is the running count of zeros.
    """
    if position_ids.dim() == 1:
        position_ids = position_ids.unsqueeze(0)
    doc = (position_ids == 0).cumsum(dim=-1)
    seqlen = position_ids.shape[-1]
    causal = torch.ones(seqlen, seqlen, dtype=torch.bool, device=position_ids.device).tril()
    return ((doc.unsqueeze(-1) == doc.unsqueeze(-2)) & causal).unsqueeze(1)


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in fp32, scaled by a learned weight (as HF Llama)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:
        """Set the scale to ones."""
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise the last dimension of ``x``."""
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class CoreAttention(nn.Module):
    """softmax(QK^T/sqrt(d))V over ``[batch, heads, seq, head_dim]``; the unit selective recompute names."""

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Causal attention; ``attn_mask`` (boolean, True = attend) replaces the plain causal mask."""
        # Local head counts (after any TP split) decide how often each KV head serves query heads.
        n_rep = q.shape[1] // k.shape[1]
        if n_rep > 1:
            k = k.repeat_interleave(n_rep, dim=1)
            v = v.repeat_interleave(n_rep, dim=1)
        if attn_mask is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)


class Attention(nn.Module):
    """Grouped-query self-attention with RoPE; one fused ``wqkv`` or separate ``wq``/``wk``/``wv``."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.head_dim = cfg.head_dim
        q_dim, kv_dim = cfg.num_attention_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        bias = cfg.attention_bias
        self.fused = cfg.fuse_qkv
        if self.fused:
            # Split sizes come from the config: the shard plan refuses TP for fused layouts.
            self.qkv_split = (q_dim, kv_dim, kv_dim)
            self.wqkv = nn.Linear(cfg.hidden_size, q_dim + 2 * kv_dim, bias=bias)
        else:
            self.wq = nn.Linear(cfg.hidden_size, q_dim, bias=bias)
            self.wk = nn.Linear(cfg.hidden_size, kv_dim, bias=bias)
            self.wv = nn.Linear(cfg.hidden_size, kv_dim, bias=bias)
        self.wo = nn.Linear(q_dim, cfg.hidden_size, bias=bias)
        self.core_attention = CoreAttention()

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attn_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Attend over ``x`` ``[batch, seq, hidden]``."""
        bsz, seqlen, _ = x.shape
        if self.fused:
            q, k, v = self.wqkv(x).split(self.qkv_split, dim=-1)
        else:
            q, k, v = self.wq(x), self.wk(x), self.wv(x)
        q = q.view(bsz, seqlen, -1, self.head_dim)
        k = k.view(bsz, seqlen, -1, self.head_dim)
        v = v.view(bsz, seqlen, -1, self.head_dim)
        q, k = apply_rotary_emb(q, k, cos, sin)
        out = self.core_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask)
        return self.wo(out.transpose(1, 2).reshape(bsz, seqlen, -1))


class FeedForward(nn.Module):
    """SwiGLU MLP: ``w2(silu(w1 x) * w3 x)``; w1/w3 optionally fused as ``w13`` (gate rows first)."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        hidden, ffn, bias = cfg.hidden_size, cfg.ffn_hidden_size, cfg.mlp_bias
        self.fused = cfg.fuse_gate_up
        if self.fused:
            self.w13 = nn.Linear(hidden, 2 * ffn, bias=bias)
        else:
            self.w1 = nn.Linear(hidden, ffn, bias=bias)
            self.w3 = nn.Linear(hidden, ffn, bias=bias)
        self.w2 = nn.Linear(ffn, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the MLP to ``x`` ``[batch, seq, hidden]``."""
        if self.fused:
            gate, up = self.w13(x).chunk(2, dim=-1)
        else:
            gate, up = self.w1(x), self.w3(x)
        return self.w2(F.silu(gate) * up)


class TransformerBlock(nn.Module):
    """Pre-norm decoder block: attention then MLP, each around a residual."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attn_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Run the block on ``x`` ``[batch, seq, hidden]``."""
        h = x + self.attention(self.attention_norm(x), cos, sin, attn_mask)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    """The Llama causal LM: embeddings, ``layers`` (a ModuleDict keyed "0", "1", ...), norm, output."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings: nn.Embedding | None = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.rope = RotaryEmbedding(cfg)
        self.layers = nn.ModuleDict({str(i): TransformerBlock(cfg) for i in range(cfg.num_layers)})
        self.norm: RMSNorm | None = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.output: nn.Linear | None = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        tie_weights(self)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``[batch, seq, vocab]`` for token ids ``[batch, seq]`` (hidden states on pipeline stages).

        RoPE uses ``position_ids`` when given (else 0..seq-1). Where they restart at 0 inside a row,
        the row holds packed documents and attention stays inside each one through an explicit mask;
        otherwise attention takes SDPA's faster ``is_causal`` path.
        """
        h = self.tok_embeddings(input_ids) if self.tok_embeddings is not None else input_ids
        cos, sin = self.rope(position_ids)
        attn_mask = None
        # Collators send position_ids for unpacked rows too; checking for restarts costs one host
        # sync but keeps those rows on the fused causal kernel instead of a [b, s, s] mask.
        if position_ids is not None and bool((position_ids[..., 1:] == 0).any()):
            attn_mask = document_causal_mask(position_ids)
        for layer in self.layers.values():
            h = layer(h, cos, sin, attn_mask)
        h = self.norm(h) if self.norm is not None else h
        return self.output(h) if self.output is not None else h


def tie_weights(model: Transformer) -> None:
    """Make ``output.weight`` the very Parameter ``tok_embeddings.weight`` when the config ties them."""
    if model.cfg.tie_word_embeddings and model.output is not None and model.tok_embeddings is not None:
        model.output.weight = model.tok_embeddings.weight


def build_model(cfg: LlamaConfig) -> Transformer:
    """Build the model on the current default device (meta included); values come from ``init_weights``."""
    return Transformer(cfg)


@torch.no_grad()
def init_weights(model: Transformer, cfg: LlamaConfig) -> None:
    """Fill every parameter and buffer: N(0, init_std), output projections scaled, norms at one.

    Like Megatron, ``wo`` and ``w2`` use ``init_std / sqrt(2 * num_layers)`` so the residual stream
    does not grow with depth. Works after ``model.to_empty(device=...)``, which breaks the tie
    between embeddings and output, so the tie is restored first.
    """
    tie_weights(model)
    scaled_std = cfg.init_std / math.sqrt(2 * cfg.num_layers)
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            if module is model.output and cfg.tie_word_embeddings and model.tok_embeddings is not None:
                continue  # the shared matrix is initialised once, as the embedding
            scaled = name.endswith(("attention.wo", "feed_forward.w2"))
            nn.init.normal_(module.weight, mean=0.0, std=scaled_std if scaled else cfg.init_std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=cfg.init_std)
        elif isinstance(module, (RMSNorm, RotaryEmbedding)):
            module.reset_parameters()


def num_parameters(cfg: LlamaConfig, include_input_embedding: bool = True) -> int:
    """Parameter count from the config alone (a tied matrix counts once)."""
    h, ffn = cfg.hidden_size, cfg.ffn_hidden_size
    q_dim, kv_dim = cfg.num_attention_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    attn = h * (q_dim + 2 * kv_dim) + q_dim * h
    if cfg.attention_bias:
        attn += q_dim + 2 * kv_dim + h
    mlp = 3 * h * ffn + (2 * ffn + h if cfg.mlp_bias else 0)
    total = cfg.num_layers * (attn + mlp + 2 * h) + h + cfg.vocab_size * h  # blocks, final norm, output
    if include_input_embedding and not cfg.tie_word_embeddings:
        total += cfg.vocab_size * h
    return total


def flops_per_token(cfg: LlamaConfig, seq_len: int) -> float:
    """Training FLOPs per token: ``6 * N + 12 * num_layers * heads * head_dim * seq_len``.

    N counts every parameter used in a matmul, i.e. all but the input embedding table (the output
    projection counts even when tied). 6 = forward (2) + backward (4) per multiply-add; the second
    term is QK^T and AV (Kaplan et al. / PaLM appendix), with heads * head_dim = hidden for Llama.
    """
    attention = 12 * cfg.num_layers * cfg.num_attention_heads * cfg.head_dim * seq_len
    return float(6 * num_parameters(cfg, include_input_embedding=False) + attention)


def pipeline_blocks(cfg: LlamaConfig) -> list[str]:
    """FQNs of the decoder blocks in order: the points a pipeline split may cut between."""
    return [f"layers.{i}" for i in range(cfg.num_layers)]
