"""Declare a transformer family as data: HF config and key tables in, a complete ``ModelSpec`` out.

A Llama-like family (Qwen2, Mistral, ...) is its tables plus a call to :func:`transformer_family`;
everything else (model, init, shard plan, adapter, FLOPs, pipeline blocks, PEFT targets) comes
from the kit. docs/plugins.md shows a Qwen2 plugin written this way.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from nxdt.modeling.attention import CoreAttention
from nxdt.modeling.config import TransformerConfig
from nxdt.modeling.counting import active_parameters, flops_per_token, num_parameters
from nxdt.modeling.hf_adapter import LLAMA_STYLE_KEYS, HFKeyTable, TableAdapter
from nxdt.modeling.nxdt_keys import MOE_KEYS, config_from_keys
from nxdt.modeling.sharding import transformer_plan
from nxdt.modeling.transformer import build_transformer, init_parameter, init_transformer, pipeline_blocks
from nxdt.specs import ModelSpec, ParallelDims

#: HF config.json key -> TransformerConfig field, shared by Llama-style decoders.
LLAMA_STYLE_CONFIG = {
    "vocab_size": "vocab_size",
    "hidden_size": "hidden_size",
    "num_hidden_layers": "num_layers",
    "num_attention_heads": "num_attention_heads",
    "num_key_value_heads": "num_kv_heads",
    "intermediate_size": "ffn_hidden_size",
    "max_position_embeddings": "max_position_embeddings",
    "rms_norm_eps": "norm_eps",
    "tie_word_embeddings": "tie_word_embeddings",
    "initializer_range": "init_std",
    "head_dim": "head_dim",
    "attention_dropout": "attention_dropout",
}

#: NxDT PEFT target names -> module globs of a kit transformer (fused and unfused layouts).
KIT_PEFT_TARGETS = {
    "qkv_proj": ["layers.*.attention.wq", "layers.*.attention.wk", "layers.*.attention.wv", "layers.*.attention.wqkv"],
    "q_proj": ["layers.*.attention.wq"],
    "k_proj": ["layers.*.attention.wk"],
    "v_proj": ["layers.*.attention.wv"],
    "o_proj": ["layers.*.attention.wo"],
    "gate_up_proj": ["layers.*.feed_forward.w1", "layers.*.feed_forward.w3", "layers.*.feed_forward.w13"],
    "gate_proj": ["layers.*.feed_forward.w1"],
    "up_proj": ["layers.*.feed_forward.w3"],
    "down_proj": ["layers.*.feed_forward.w2"],
}


@dataclass(frozen=True)
class HFConfigTable:
    """How a family's config.json maps onto ``TransformerConfig``."""

    model_type: str
    architecture: str
    keys: Mapping[str, str] = field(default_factory=lambda: dict(LLAMA_STYLE_CONFIG))
    #: config fields the family always has, whatever config.json says (Qwen2: qkv_bias=True)
    fixed: Mapping[str, Any] = field(default_factory=dict)
    #: HF keys that must hold one of these values to be read (hidden_act: ("silu",))
    accepts: Mapping[str, Sequence[Any]] = field(default_factory=lambda: {"hidden_act": ("silu",)})
    #: HF keys written as constants on export
    constants: Mapping[str, Any] = field(default_factory=lambda: {"hidden_act": "silu"})
    #: more HF model types read by this table (``mistral`` for the llama family)
    also_reads: Sequence[str] = ()


def read_hf_config(table: HFConfigTable, hf: Mapping[str, Any], config_class: Any = TransformerConfig) -> Any:
    """``config_class`` from an HF config.json dict (transformers 4.x or 5.x rope keys)."""
    model_type = hf.get("model_type", table.model_type)
    types = (table.model_type, *table.also_reads)
    if model_type not in types:
        raise ValueError(f"cannot read HF model_type {model_type!r}; expected one of {types}")
    for key, allowed in table.accepts.items():
        if key in hf and hf[key] not in allowed:
            raise ValueError(f"{model_type}: {key} {hf[key]!r} is not supported (only {', '.join(map(repr, allowed))})")
    # transformers 5 nests theta inside `rope_parameters`; 4.x has top-level rope_theta + rope_scaling.
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    rope_theta = rope.pop("rope_theta", hf.get("rope_theta", config_class.rope_theta))
    kwargs = {ours: hf[theirs] for theirs, ours in table.keys.items() if hf.get(theirs) is not None}
    if "attention_bias" in hf:
        kwargs["attention_bias"] = bool(hf["attention_bias"])
    if "mlp_bias" in hf:
        kwargs["mlp_bias"] = bool(hf["mlp_bias"])
    if hf.get("sliding_window") is not None and hf.get("use_sliding_window", True):
        window = int(hf["sliding_window"])
        # A window as long as the context is plain causal attention (how HF configs say "off").
        if window < kwargs.get("max_position_embeddings", config_class.max_position_embeddings):
            kwargs["sliding_window"] = window
    kwargs.update(table.fixed)
    return config_class(rope_theta=float(rope_theta), rope_scaling=rope or None, **kwargs)


def write_hf_config(table: HFConfigTable, cfg: TransformerConfig) -> dict[str, Any]:
    """An HF config.json dict for ``cfg``, readable by transformers 4.x and 5.x alike."""
    rope_scaling = dict(cfg.rope_scaling) if cfg.rope_scaling else None
    out: dict[str, Any] = {"architectures": [table.architecture], "model_type": table.model_type}
    out.update({theirs: getattr(cfg, ours) for theirs, ours in table.keys.items()})
    out.update(table.constants)
    out["attention_bias"] = cfg.attention_bias
    out["mlp_bias"] = cfg.mlp_bias
    out["sliding_window"] = cfg.sliding_window
    # 5.x reads rope_parameters; 4.x reads rope_theta and rope_scaling (5.x derives the same from them).
    out["rope_parameters"] = {"rope_type": "default", **(rope_scaling or {}), "rope_theta": cfg.rope_theta}
    out["rope_theta"] = cfg.rope_theta
    out["rope_scaling"] = rope_scaling
    return out


def transformer_family(
    family: str,
    hf_config: HFConfigTable,
    *,
    config_class: type = TransformerConfig,
    hf_keys: HFKeyTable = LLAMA_STYLE_KEYS,
    nxdt_fixed: Mapping[str, Sequence[Any]] | None = None,
    nxdt_unsupported: Sequence[str] = (),
    build_model: Callable[[Any], Any] = build_transformer,
    moe: bool = False,
    **spec_fields: Any,
) -> ModelSpec:
    """A complete ModelSpec for a family whose model is the kit's ``Transformer`` (or a subclass).

    ``nxdt_fixed`` are NxDT ``model.*`` keys accepted only with the listed values (a decoder with
    RMSNorm and SwiGLU refuses ``normalization: layernorm``); ``nxdt_unsupported`` are refused
    outright. ``moe``: the family reads ``model.moe`` (mixture-of-experts blocks from the kit) and
    reports active parameters. ``spec_fields`` override any other ``ModelSpec`` field.
    """
    fixed = {
        "normalization": ("rmsnorm",),
        "activation": ("swiglu", "fast-swiglu"),
        "position_embedding_type": ("rope",),
        "transformer_block_type": ("pre_ln",),
        # Llama-style config.json files have no partial rotary; a family that does overrides this.
        "rotary_percentage": (1.0,),
        **(nxdt_fixed or {}),
    }

    def config_from_nxdt(section: Mapping[str, Any], base: Any = None) -> Any:
        return config_from_keys(
            section, base, config_class, family=family, fixed=fixed, unsupported=nxdt_unsupported,
            extra=MOE_KEYS if moe else None,
        )

    def shard_plan(cfg: Any, parallel: ParallelDims) -> Any:
        return transformer_plan(cfg, parallel, family)

    fields: dict[str, Any] = dict(
        family=family,
        config_class=config_class,
        build_model=build_model,
        init_weights=init_transformer,
        init_parameter=init_parameter,
        config_from_nxdt=config_from_nxdt,
        config_from_hf=lambda hf: read_hf_config(hf_config, hf, config_class),
        config_to_hf=lambda cfg: write_hf_config(hf_config, cfg),
        shard_plan=shard_plan,
        state_dict_adapter=lambda cfg: TableAdapter(hf_keys, cfg, family=family),
        flops_per_token=flops_per_token,
        num_parameters=num_parameters,
        hf_model_types=(hf_config.model_type, *hf_config.also_reads),
        hf_architecture=hf_config.architecture,
        task="causal_lm",
        pipeline_blocks=pipeline_blocks,
        peft_targets=KIT_PEFT_TARGETS,
        recompute_modules={"CoreAttention": CoreAttention},
        is_moe=moe,
        active_parameters=active_parameters if moe else None,
    )
    fields.update(spec_fields)
    return ModelSpec(**fields)
