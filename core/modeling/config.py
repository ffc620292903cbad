"""``TransformerConfig``: the architecture of any model built from the kit, in explicit sizes.

Field names follow Hugging Face's where one exists (``num_kv_heads`` is HF's
``num_key_value_heads``, ``ffn_hidden_size`` its ``intermediate_size``). A family may subclass it
to change defaults; the kit's modules never read a family's own class.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from nxdt.modeling.mlp import GATED
from nxdt.modeling.moe import MoEConfig, as_moe_config

#: MLP activations the kit implements; the gated ones (``*glu``) have a gate and an up projection.
ACTIVATIONS = ("swiglu", "geglu", "gelu", "gelu_tanh", "relu", "silu")
NORMS = ("rmsnorm", "layernorm")
POSITION_EMBEDDINGS = ("rope", "learned_absolute")
_ROPE_SCALING_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


@dataclass
class TransformerConfig:
    """A decoder (or encoder) stack: sizes, positions, norms, activation, biases, tying and init."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    num_layers: int = 32
    num_attention_heads: int = 32
    num_kv_heads: int | None = None  # None: one KV head per query head (MHA)
    ffn_hidden_size: int = 11008
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # llama3 long-context scaling, as in HF config.json
    norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    fuse_qkv: bool = False  # one wqkv matrix ([q; k; v] rows) instead of wq/wk/wv
    fuse_gate_up: bool = False  # one w13 matrix ([gate; up] rows) instead of w1/w3
    init_std: float = 0.02
    attention_bias: bool = False  # biases on q, k, v and o
    mlp_bias: bool = False
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    qkv_bias: bool | None = None  # None: as attention_bias (Qwen2 has q/k/v biases without an o bias)
    norm: str = "rmsnorm"
    activation: str = "swiglu"
    position_embedding: str = "rope"
    rotary_percentage: float = 1.0  # share of head_dim that RoPE rotates (GPT-NeoX / Megatron partial rotary)
    sliding_window: int | None = None  # each token attends to itself and the window - 1 tokens before it
    causal: bool = True  # False: bidirectional (encoders)
    post_norm: bool = False  # norms after each residual add (BERT, the original Transformer); no final norm
    scaled_init: bool = True  # output projections get init_std / sqrt(2 * num_layers)
    hidden_dropout: float = 0.0  # on embeddings and on each residual branch's output
    attention_dropout: float = 0.0  # on attention probabilities
    ffn_dropout: float = 0.0  # inside the MLP, after the activation
    moe: MoEConfig | None = None  # mixture-of-experts feed-forward on every moe.frequency-th block (a dict is read too)

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
        if self.qkv_bias is None:
            self.qkv_bias = self.attention_bias
        for name, value, allowed in (
            ("norm", self.norm, NORMS),
            ("activation", self.activation, ACTIVATIONS),
            ("position_embedding", self.position_embedding, POSITION_EMBEDDINGS),
        ):
            if value not in allowed:
                raise ValueError(f"{name} {value!r} is not one of {', '.join(allowed)}")
        if self.position_embedding == "rope" and self.rotary_dim % 2:
            raise ValueError(f"the rotary dimension {self.rotary_dim} must be even (head_dim {self.head_dim})")
        if self.fuse_gate_up and not self.gated:
            raise ValueError(f"fuse_gate_up needs a gated activation (swiglu, geglu), not {self.activation!r}")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window must be positive, got {self.sliding_window}")
        self.rope_scaling = normalize_rope_scaling(self.rope_scaling)
        self.moe = as_moe_config(self.moe)
        if self.moe is not None and self.mlp_bias:
            raise ValueError("mixture-of-experts layers have no MLP biases; set mlp_bias (has_bias) to false")

    @property
    def gated(self) -> bool:
        """Whether the MLP has a gate projection (SwiGLU, GeGLU)."""
        return self.activation in GATED

    @property
    def rotary_dim(self) -> int:
        """How many leading channels of each head RoPE rotates."""
        assert self.head_dim is not None
        return int(self.head_dim * self.rotary_percentage)

    @property
    def q_dim(self) -> int:
        """Width of the query projection (heads x head_dim)."""
        assert self.head_dim is not None
        return self.num_attention_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        """Width of the key (and of the value) projection."""
        assert self.head_dim is not None and self.num_kv_heads is not None
        return self.num_kv_heads * self.head_dim

    @property
    def out_init_std(self) -> float:
        """Init std of the projections that write into the residual stream (depth-scaled, as Megatron)."""
        return self.init_std / math.sqrt(2 * self.num_layers) if self.scaled_init else self.init_std


def normalize_rope_scaling(scaling: dict[str, Any] | None) -> dict[str, Any] | None:
    """llama3 rope scaling as a canonical dict, None for plain RoPE; other kinds are refused."""
    if not scaling:
        return None
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return None
    if rope_type != "llama3":
        raise ValueError(f"rope scaling type {rope_type!r} is not supported; use 'llama3'")
    missing = [key for key in _ROPE_SCALING_KEYS if key not in scaling]
    if missing:
        raise ValueError(f"llama3 rope_scaling lacks {missing}")
    return {"rope_type": "llama3", **{key: scaling[key] for key in _ROPE_SCALING_KEYS}}
