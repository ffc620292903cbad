"""Self-attention: GQA with optional biases, causal or bidirectional, packed-document and sliding-window masks.

Written to be parallelised from outside: tensor parallelism re-shards the q/k/v/o Linears, so the
head counts come from tensor shapes (``view(..., -1, head_dim)``), never from a config.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nxdt.modeling.kv_cache import LayerKV
from nxdt.modeling.rope import apply_rotary


def has_document_restarts(position_ids: torch.Tensor | None) -> bool:
    """Whether ``position_ids`` restart at 0 inside a row (packed documents); one host sync."""
    return position_ids is not None and position_ids.shape[-1] > 1 and bool((position_ids[..., 1:] == 0).any())


def attention_mask(
    seq_len: int,
    device: torch.device,
    *,
    causal: bool = True,
    position_ids: torch.Tensor | None = None,
    padding_mask: torch.Tensor | None = None,
    sliding_window: int | None = None,
) -> torch.Tensor | None:
    """Boolean ``[batch|1, 1, seq, seq]`` mask (True: may attend), or None where a plain causal kernel suffices.

    - packed documents: where ``position_ids`` restart at 0 a new document begins, and no token
      attends across a document boundary;
    - ``padding_mask`` ``[batch, seq]`` (1 or True for real tokens, HF's ``attention_mask``): no
      token attends to padding;
    - ``sliding_window``: a token attends to itself and the ``sliding_window - 1`` tokens before it.

    Every query keeps at least its own position, so a padding query never has an empty row
    (which would make softmax NaN and poison the real tokens through masked values).
    """
    restarts = has_document_restarts(position_ids)
    windowed = sliding_window is not None and seq_len > sliding_window
    if causal and not restarts and padding_mask is None and not windowed:
        return None
    if not causal and not restarts and padding_mask is None:
        return None
    idx = torch.arange(seq_len, device=device)
    mask = torch.ones(seq_len, seq_len, dtype=torch.bool, device=device)
    if causal:
        mask = mask.tril()
    if windowed:
        assert sliding_window is not None
        mask = mask & (idx[:, None] - idx[None, :] < sliding_window)
    mask = mask[None]
    if restarts:
        assert position_ids is not None
        ids = position_ids if position_ids.dim() == 2 else position_ids.unsqueeze(0)
        doc = (ids == 0).cumsum(dim=-1)
        mask = mask & (doc.unsqueeze(-1) == doc.unsqueeze(-2))
    if padding_mask is not None:
        mask = mask & padding_mask.bool()[:, None, :]
    mask = mask | torch.eye(seq_len, dtype=torch.bool, device=device)[None]
    return mask.unsqueeze(1)


class CoreAttention(nn.Module):
    """softmax(QK^T/sqrt(d))V over ``[batch, heads, seq, head_dim]``: the unit selective recompute names."""

    def __init__(self, causal: bool = True, dropout: float = 0.0):
        super().__init__()
        self.causal, self.dropout = causal, dropout

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Attention; ``attn_mask`` (boolean, True = attend) replaces the plain causal/full pattern."""
        # Local head counts (after any TP split) decide how often each KV head serves query heads.
        n_rep = q.shape[1] // k.shape[1]
        if n_rep > 1:
            k = k.repeat_interleave(n_rep, dim=1)
            v = v.repeat_interleave(n_rep, dim=1)
        p = self.dropout if self.training else 0.0
        if attn_mask is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=self.causal, dropout_p=p)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=p)


class Attention(nn.Module):
    """Grouped-query self-attention: ``wq``/``wk``/``wv`` (or one fused ``wqkv``), ``wo``, optional RoPE."""

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        qkv_bias: bool = False,
        out_bias: bool = False,
        fused_qkv: bool = False,
        causal: bool = True,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.head_dim = head_dim
        q_dim, kv_dim = num_heads * head_dim, num_kv_heads * head_dim
        self.fused = fused_qkv
        if fused_qkv:
            # Split sizes come from construction: shard plans refuse TP for fused layouts.
            self.qkv_split = (q_dim, kv_dim, kv_dim)
            self.wqkv = nn.Linear(hidden_size, q_dim + 2 * kv_dim, bias=qkv_bias)
        else:
            self.wq = nn.Linear(hidden_size, q_dim, bias=qkv_bias)
            self.wk = nn.Linear(hidden_size, kv_dim, bias=qkv_bias)
            self.wv = nn.Linear(hidden_size, kv_dim, bias=qkv_bias)
        self.wo = nn.Linear(q_dim, hidden_size, bias=out_bias)
        setattr(self.wo, "nxdt_residual_output", True)  # depth-scaled at init  # noqa: B010
        self.core_attention = CoreAttention(causal, dropout)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor | None = None,
        sin: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        kv_cache: LayerKV | None = None,
    ) -> torch.Tensor:
        """Attend over ``x`` ``[batch, seq, hidden]``; RoPE applies when ``cos``/``sin`` are given.

        With ``kv_cache`` (incremental decoding) the new keys/values are appended to the cache and
        the queries attend over all of it; ``attn_mask`` then covers every cached slot.
        """
        bsz, seqlen, _ = x.shape
        if self.fused:
            q, k, v = self.wqkv(x).split(self.qkv_split, dim=-1)
        else:
            q, k, v = self.wq(x), self.wk(x), self.wv(x)
        q = q.view(bsz, seqlen, -1, self.head_dim)
        k = k.view(bsz, seqlen, -1, self.head_dim)
        v = v.view(bsz, seqlen, -1, self.head_dim)
        if cos is not None and sin is not None:
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if kv_cache is not None:
            k, v = kv_cache.update(k, v)
        out = self.core_attention(q, k, v, attn_mask)
        return self.wo(out.transpose(1, 2).reshape(bsz, seqlen, -1))
