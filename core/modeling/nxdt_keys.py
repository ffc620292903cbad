"""NxDT ``model.*`` keys -> a kit config: every key is applied, or refused with one line.

A family states which keys it reads (by default all the kit understands), which it accepts only
with one value (``normalization: rmsnorm`` for Llama) and the engine handles the rest
(``encoder_seq_length`` is checked against ``data.seq_length``, ``moe`` against the family's MoE
support). A key the family cannot honour is refused, never ignored.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

#: NxDT activation names -> kit names (Megatron's ``gelu`` is the erf GELU).
ACTIVATION_NAMES = {
    "swiglu": "swiglu",
    "fast-swiglu": "swiglu",
    "geglu": "geglu",
    "fast-geglu": "geglu",
    "gelu": "gelu",
    "gelu_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
    "openai_gelu": "gelu_tanh",
    "relu": "relu",
    "silu": "silu",
}
BLOCK_TYPES = {"pre_ln": False, "post_ln": True}


def _activation(value: Any) -> dict[str, Any]:
    if value not in ACTIVATION_NAMES:
        raise ValueError(f"activation {value!r} is not one of {', '.join(ACTIVATION_NAMES)}")
    return {"activation": ACTIVATION_NAMES[value]}


def _block_type(value: Any) -> bool:
    if value not in BLOCK_TYPES:
        raise ValueError(f"transformer_block_type {value!r} is not one of {', '.join(BLOCK_TYPES)}")
    return BLOCK_TYPES[value]


def _bias(value: Any) -> dict[str, Any]:
    return {"attention_bias": bool(value), "mlp_bias": bool(value), "qkv_bias": bool(value)}


#: key -> config field, or -> a function of the value returning {field: value}
KIT_KEYS: dict[str, str | Callable[[Any], dict[str, Any]]] = {
    "vocab_size": "vocab_size",
    "hidden_size": "hidden_size",
    "num_layers": "num_layers",
    "num_attention_heads": "num_attention_heads",
    "num_kv_heads": "num_kv_heads",
    "kv_channels": "head_dim",
    "ffn_hidden_size": "ffn_hidden_size",
    "max_position_embeddings": "max_position_embeddings",
    "rope_theta": "rope_theta",
    "rope_scaling": lambda v: {"rope_scaling": dict(v) if isinstance(v, Mapping) else v},
    "rotary_percentage": "rotary_percentage",
    "layernorm_epsilon": "norm_eps",
    "normalization": "norm",
    "activation": _activation,
    "position_embedding_type": "position_embedding",
    "has_bias": _bias,
    "transformer_block_type": lambda v: {"post_norm": _block_type(v)},
    "share_embeddings_and_output_weights": "tie_word_embeddings",
    "fuse_qkv": "fuse_qkv",
    "fuse_gate_up": "fuse_gate_up",
    "init_method_std": "init_std",
    "use_scaled_init_method": "scaled_init",
    "hidden_dropout": "hidden_dropout",
    "attention_dropout": "attention_dropout",
    "ffn_dropout": "ffn_dropout",
}

#: ``model.moe`` for a family with mixture-of-experts layers (``transformer_family(..., moe=True)``)
MOE_KEYS: dict[str, str | Callable[[Any], dict[str, Any]]] = {"moe": lambda v: {"moe": dict(v)}}

#: keys the engine handles for every family (resolve checks them), never family config fields
ENGINE_KEYS = ("encoder_seq_length", "make_vocab_size_divisible_by", "moe")
#: keys that change kernels or numerics tricks, not the model; reported as having no effect here
NO_EFFECT_KEYS = ("persist_layer_norm", "apply_query_key_layer_scaling", "qkv_linear")


def config_from_keys(
    section: Mapping[str, Any],
    base: Any,
    config_class: type,
    *,
    family: str,
    fixed: Mapping[str, Sequence[Any]] | None = None,
    unsupported: Sequence[str] = (),
    extra: Mapping[str, str | Callable[[Any], dict[str, Any]]] | None = None,
) -> Any:
    """``config_class`` (or ``base`` with changes) from NxDT ``model`` keys that are set.

    ``fixed``: keys the family accepts only with the listed values (its architecture is fixed
    there); ``unsupported``: kit keys the family refuses; ``extra``: family-specific keys.
    Raises ValueError naming the key for anything the family cannot honour.
    """
    fixed = dict(fixed or {})
    table = {k: v for k, v in KIT_KEYS.items() if k not in unsupported and k not in fixed}
    table.update(extra or {})
    kwargs: dict[str, Any] = {}
    for key, value in section.items():
        # An engine key a family reads itself (``moe`` for an MoE family) goes to the family.
        if value is None or (key in ENGINE_KEYS and key not in table) or key in NO_EFFECT_KEYS:
            continue
        if key in fixed:
            allowed = list(fixed[key])
            if value not in allowed:
                only = allowed[0] if len(allowed) == 1 else " or ".join(map(repr, allowed))
                raise ValueError(f"model.{key}={value!r}: the {family} family supports only {only}")
            continue
        if key not in table:
            raise ValueError(f"model.{key} is not supported by the {family} family")
        target = table[key]
        kwargs.update(target(value) if callable(target) else {target: value})
    divisor = section.get("make_vocab_size_divisible_by")
    if divisor:
        vocab = kwargs.get("vocab_size", getattr(base, "vocab_size", None) if base is not None else None)
        vocab = vocab if vocab is not None else config_class().vocab_size
        kwargs["vocab_size"] = -(-vocab // divisor) * divisor
    moe = kwargs.get("moe")
    if isinstance(moe, Mapping):
        # model.moe.* keys change the base's (else the family default's) MoE settings one by one.
        current = getattr(base if base is not None else config_class(), "moe", None)
        if current is not None:
            kwargs["moe"] = {**dataclasses.asdict(current), **moe}
    if base is None:
        return config_class(**kwargs)
    if {"hidden_size", "num_attention_heads"} & kwargs.keys() and "head_dim" not in kwargs:
        kwargs["head_dim"] = None  # re-derived from the new shape
    if "attention_bias" in kwargs and "qkv_bias" not in kwargs:
        kwargs["qkv_bias"] = None
    return dataclasses.replace(base, **kwargs)
