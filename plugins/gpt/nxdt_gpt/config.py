"""``GPTConfig`` and the NxDT ``model.*`` keys of the gpt family.

One family serves both styles: a GPT-2 checkpoint (learned positions, LayerNorm, tanh GELU,
biases, tied embeddings: the defaults here, HF ``GPT2Config``'s) and a Megatron GPT described by
``megatron_gpt_config.yaml`` keys, which may switch to RoPE, RMSNorm, SwiGLU, no biases or GQA.
So unlike Llama the architecture keys are read, not pinned; only the block layout is fixed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from nxdt.modeling import TransformerConfig, config_from_keys

#: NxDT keys the family accepts only with these values (the kit builds pre-LN blocks only).
GPT_FIXED = {"transformer_block_type": ("pre_ln",)}


@dataclass
class GPTConfig(TransformerConfig):
    """A GPT decoder; the defaults are GPT-2 small's (HF ``GPT2Config``)."""

    vocab_size: int = 50257
    hidden_size: int = 768
    num_layers: int = 12
    num_attention_heads: int = 12
    # 0 means 4 x hidden_size, the default of both GPT-2 (n_inner=None) and Megatron.
    ffn_hidden_size: int = 0
    max_position_embeddings: int = 1024
    norm_eps: float = 1e-5
    tie_word_embeddings: bool = True
    attention_bias: bool = True
    mlp_bias: bool = True
    norm: str = "layernorm"
    activation: str = "gelu_tanh"
    position_embedding: str = "learned_absolute"

    def __post_init__(self) -> None:
        if not self.ffn_hidden_size:
            self.ffn_hidden_size = 4 * self.hidden_size
        super().__post_init__()


def config_from_nxdt(section: Mapping[str, Any], base: Any = None) -> GPTConfig:
    """GPTConfig from NxDT ``model.*`` keys over ``base`` (an HF config) or the GPT-2 defaults."""
    return config_from_keys(section, base, GPTConfig, family="gpt", fixed=GPT_FIXED)
