"""nxdt-mixtral: Mixtral, the kit's GQA decoder with mixture-of-experts feed-forward blocks.

Everything generic comes from ``nxdt.modeling``: attention, RMSNorm, RoPE, the MoE layer (router,
grouped experts, capacity or dropless routing, balancing losses), init, the shard plan (experts
styled for expert parallelism) and the table adapters. What is Mixtral's own: its config.json
names (``num_local_experts``, ``num_experts_per_tok``, ...) and its hub keys, one tensor per expert
(``block_sparse_moe.experts.<e>.w1/w2/w3``). The presets live in hub_registry.toml.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from nxdt import hookimpl
from nxdt.errors import NxdtError
from nxdt.modeling import (
    KIT_PEFT_TARGETS,
    LLAMA_STYLE_KEYS,
    HFConfigTable,
    HFMoEKeys,
    MoEConfig,
    MoETableAdapter,
    TransformerConfig,
    read_hf_config,
    transformer_family,
    write_hf_config,
)
from nxdt.specs import ModelSpec

NXDT_PLUGIN_API = 2


def _mixtral_moe() -> MoEConfig:
    return MoEConfig(num_experts=8, top_k=2, router_aux_loss_coef=0.001)


@dataclass
class MixtralConfig(TransformerConfig):
    """Mixtral-8x7B by default (HF ``MixtralConfig``'s defaults): 8 experts, top-2, RoPE theta 1e6."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    num_layers: int = 32
    num_attention_heads: int = 32
    num_kv_heads: int | None = 8
    ffn_hidden_size: int = 14336
    max_position_embeddings: int = 131072
    rope_theta: float = 1_000_000.0
    norm_eps: float = 1e-5
    moe: MoEConfig | None = field(default_factory=_mixtral_moe)


MIXTRAL_HF = HFConfigTable(model_type="mixtral", architecture="MixtralForCausalLM")

#: Mixtral's hub layout; transformers 5 keeps the experts fused in memory, which from_hf reads too.
MIXTRAL_MOE_KEYS = HFMoEKeys(
    router="block_sparse_moe.gate",
    expert="block_sparse_moe.experts.{e}.{w}",
    fused_gate_up="mlp.experts.gate_up_proj",
    fused_down="mlp.experts.down_proj",
    fused_router="mlp.gate.weight",
)

#: config.json -> MoEConfig field
_HF_MOE = {
    "num_local_experts": "num_experts",
    "num_experts_per_tok": "top_k",
    "router_aux_loss_coef": "router_aux_loss_coef",
    "output_router_logits": "output_router_logits",
}


def config_from_hf(hf: Mapping[str, Any]) -> MixtralConfig:
    """``MixtralConfig`` from a transformers ``config.json`` (4.x or 5.x)."""
    if hf.get("router_jitter_noise"):
        raise ValueError(f"mixtral: router_jitter_noise {hf['router_jitter_noise']} is not supported (only 0)")
    cfg = read_hf_config(MIXTRAL_HF, hf, MixtralConfig)
    hf_moe = {ours: hf[theirs] for theirs, ours in _HF_MOE.items() if hf.get(theirs) is not None}
    return dataclasses.replace(cfg, moe=dataclasses.replace(_mixtral_moe(), **hf_moe))


def config_to_hf(cfg: MixtralConfig) -> dict[str, Any]:
    """A ``MixtralForCausalLM`` config.json; refuses MoE settings that model cannot express."""
    moe = cfg.moe
    assert moe is not None
    problems = [
        "moe.frequency > 1 (Mixtral has experts in every layer)" if moe.frequency != 1 else "",
        "routing_algorithm 'sinkhorn'" if moe.routing_algorithm != "top_k" else "",
        "router_activation 'sigmoid'" if moe.router_activation != "softmax" else "",
        "normalize_top_k_affinities=false" if not moe.normalize_top_k_affinities else "",
    ]
    problems = [p for p in problems if p]
    if problems:
        raise NxdtError(f"mixtral: MixtralForCausalLM cannot express {', '.join(problems)}")
    out = write_hf_config(MIXTRAL_HF, cfg)
    out.update({theirs: getattr(moe, ours) for theirs, ours in _HF_MOE.items()})
    out["router_jitter_noise"] = 0.0
    return out


MIXTRAL_SPEC: ModelSpec = transformer_family(
    "mixtral",
    MIXTRAL_HF,
    config_class=MixtralConfig,
    # MixtralForCausalLM has no biases and one MLP shape: the experts'.
    nxdt_unsupported=("has_bias",),
    moe=True,
    config_from_hf=config_from_hf,
    config_to_hf=config_to_hf,
    state_dict_adapter=lambda cfg: MoETableAdapter(LLAMA_STYLE_KEYS, MIXTRAL_MOE_KEYS, cfg, family="mixtral"),
    # LoRA targets: the attention projections (the experts are 3-D tensors, not Linear layers).
    peft_targets={k: KIT_PEFT_TARGETS[k] for k in ("qkv_proj", "q_proj", "k_proj", "v_proj", "o_proj")},
    plugin="mixtral",
)


@hookimpl
def nxdt_register_models(register: Callable[[ModelSpec], None]) -> None:
    """Register the mixtral ModelSpec."""
    register(MIXTRAL_SPEC)
