"""NxDT ``model.*`` keys -> BertConfig: each key applied, or refused with one line naming it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from nxdt.modeling import config_from_keys
from nxdt_bert.model import BertConfig

#: keys whose only value BERT has (its architecture is fixed there)
FIXED = {
    "normalization": ("layernorm",),
    "position_embedding_type": ("learned_absolute",),
    "transformer_block_type": ("post_ln",),
    "has_bias": (True,),
}
#: kit keys BERT has no use for: it has one KV head per query head, head_dim = hidden / heads, no RoPE, no gated MLP
UNSUPPORTED = ("num_kv_heads", "kv_channels", "rope_theta", "rope_scaling", "rotary_percentage", "fuse_gate_up")
#: BERT's own keys (Megatron names): token types and the next-sentence ("binary") head
EXTRA = {"type_vocab_size": "type_vocab_size", "bert_binary_head": "next_sentence"}


def config_from_nxdt(section: Mapping[str, Any], base: Any = None) -> BertConfig:
    """``base`` (a config read from config.json) or the defaults, with the NxDT ``model`` keys applied."""
    return config_from_keys(section, base, BertConfig, family="bert", fixed=FIXED, unsupported=UNSUPPORTED, extra=EXTRA)
