"""Parameter counts and training FLOPs of a kit transformer, from its config alone (no build)."""

from __future__ import annotations

from nxdt.modeling.config import TransformerConfig
from nxdt.modeling.moe import moe_parameter_counts


def num_parameters(cfg: TransformerConfig, include_input_embedding: bool = True, active: bool = False) -> int:
    """Exact parameter count (a tied matrix counts once); optionally without the input embedding tables.

    ``active``: only the parameters one token uses (an MoE layer's router and top_k of its experts).
    """
    h, ffn = cfg.hidden_size, cfg.ffn_hidden_size
    q_dim, kv_dim = cfg.q_dim, cfg.kv_dim
    attn = h * (q_dim + 2 * kv_dim) + q_dim * h
    if cfg.qkv_bias:
        attn += q_dim + 2 * kv_dim
    if cfg.attention_bias:
        attn += h
    mlp_in = (2 if cfg.gated else 1) * h * ffn
    mlp = mlp_in + ffn * h + ((2 if cfg.gated else 1) * ffn + h if cfg.mlp_bias else 0)
    norm = h * (2 if cfg.norm == "layernorm" else 1)
    final_norm = 0 if cfg.post_norm else norm
    total = cfg.num_layers * (attn + mlp + 2 * norm) + final_norm + cfg.vocab_size * h  # blocks, final norm, output
    if cfg.moe is not None:
        moe_all, moe_active = moe_parameter_counts(h, ffn, cfg.gated, cfg.moe)
        total += len(cfg.moe.moe_layers(cfg.num_layers)) * ((moe_active if active else moe_all) - mlp)
    if include_input_embedding:
        if not cfg.tie_word_embeddings:
            total += cfg.vocab_size * h
        if cfg.position_embedding == "learned_absolute":
            total += cfg.max_position_embeddings * h
    return total


def flops_per_token(cfg: TransformerConfig, seq_len: int) -> float:
    """Training FLOPs per token: ``6 * N + 12 * num_layers * heads * head_dim * seq_len``.

    N counts every parameter used in a matmul, i.e. all but the input embedding tables (the output
    projection counts even when tied). 6 = forward (2) + backward (4) per multiply-add; the second
    term is QK^T and AV (Kaplan et al. / PaLM appendix). A sliding window bounds the attended span.
    An MoE layer counts its router and the ``top_k`` experts a token runs through.
    """
    span = min(seq_len, cfg.sliding_window) if cfg.sliding_window else seq_len
    attention = 12 * cfg.num_layers * cfg.q_dim * span
    # A token runs through its top_k experts only: the active parameters do its matmuls.
    return float(6 * num_parameters(cfg, include_input_embedding=False, active=True) + attention)


def active_parameters(cfg: TransformerConfig) -> int:
    """Parameters one token uses (all of them for a dense model; the router and top_k experts of an MoE layer)."""
    return num_parameters(cfg, active=True)
