"""The model kit: the generic parts of transformer families, taking explicit sizes.

RoPE (llama3 scaling, partial rotary), attention (causal or bidirectional, GQA, biases, packed
documents, sliding windows, head counts from tensor shapes), RMSNorm and LayerNorm, gated and
plain MLPs, the block and skeleton with the pipeline pass-through, tied embeddings, depth-scaled
init, parameter and FLOP counts, a table-driven HF adapter, the shard plan, mixture-of-experts
layers (router, grouped experts, capacity or dropless routing, balancing losses; nxdt.modeling.moe)
and :func:`transformer_family`, which declares a whole family from tables.
"""

from nxdt.modeling.attention import Attention, CoreAttention, attention_mask, has_document_restarts
from nxdt.modeling.config import TransformerConfig
from nxdt.modeling.counting import active_parameters, flops_per_token, num_parameters
from nxdt.modeling.family import (
    KIT_PEFT_TARGETS,
    LLAMA_STYLE_CONFIG,
    HFConfigTable,
    read_hf_config,
    transformer_family,
    write_hf_config,
)
from nxdt.modeling.hf_adapter import LLAMA_STYLE_KEYS, HFKeyTable, TableAdapter
from nxdt.modeling.mlp import MLP
from nxdt.modeling.moe import MoE, MoEConfig
from nxdt.modeling.moe_adapter import HFMoEKeys, MoETableAdapter
from nxdt.modeling.norms import RMSNorm, build_norm
from nxdt.modeling.nxdt_keys import config_from_keys
from nxdt.modeling.rope import RotaryEmbedding, apply_rotary, rope_inv_freq
from nxdt.modeling.sharding import transformer_plan
from nxdt.modeling.transformer import (
    Transformer,
    TransformerBlock,
    build_transformer,
    init_transformer,
    pipeline_blocks,
    tie_weights,
)

__all__ = [
    "KIT_PEFT_TARGETS",
    "LLAMA_STYLE_CONFIG",
    "LLAMA_STYLE_KEYS",
    "MLP",
    "Attention",
    "CoreAttention",
    "HFConfigTable",
    "HFKeyTable",
    "HFMoEKeys",
    "MoE",
    "MoEConfig",
    "MoETableAdapter",
    "RMSNorm",
    "RotaryEmbedding",
    "TableAdapter",
    "Transformer",
    "TransformerBlock",
    "TransformerConfig",
    "active_parameters",
    "apply_rotary",
    "attention_mask",
    "build_norm",
    "build_transformer",
    "config_from_keys",
    "flops_per_token",
    "has_document_restarts",
    "init_transformer",
    "num_parameters",
    "pipeline_blocks",
    "read_hf_config",
    "rope_inv_freq",
    "tie_weights",
    "transformer_family",
    "transformer_plan",
    "write_hf_config",
]
