"""nxdt-llama: registers the Llama family (Llama 2/3/3.1, Mistral without sliding window)."""

from __future__ import annotations

from collections.abc import Callable

from nxdt import hookimpl
from nxdt.specs import ModelSpec
from nxdt_llama.adapter import config_from_hf, config_from_nxdt, config_to_hf, state_dict_adapter
from nxdt_llama.model import (
    CoreAttention,
    LlamaConfig,
    build_model,
    flops_per_token,
    init_weights,
    pipeline_blocks,
)
from nxdt_llama.sharding import shard_plan

LLAMA_SPEC = ModelSpec(
    family="llama",
    config_class=LlamaConfig,
    build_model=build_model,
    init_weights=init_weights,
    config_from_nxdt=config_from_nxdt,
    config_from_hf=config_from_hf,
    config_to_hf=config_to_hf,
    shard_plan=shard_plan,
    state_dict_adapter=state_dict_adapter,
    flops_per_token=flops_per_token,
    hf_model_types=("llama", "mistral"),
    hf_architecture="LlamaForCausalLM",
    task="causal_lm",
    is_moe=False,
    pipeline_blocks=pipeline_blocks,
    peft_targets={
        "qkv_proj": [
            "layers.*.attention.wq",
            "layers.*.attention.wk",
            "layers.*.attention.wv",
            "layers.*.attention.wqkv",
        ],
        "o_proj": ["layers.*.attention.wo"],
        "gate_up_proj": ["layers.*.feed_forward.w1", "layers.*.feed_forward.w3", "layers.*.feed_forward.w13"],
        "down_proj": ["layers.*.feed_forward.w2"],
    },
    recompute_modules={"CoreAttention": CoreAttention},
    plugin="llama",
)


@hookimpl
def nxdt_register_models(register: Callable[[ModelSpec], None]) -> None:
    """Register the llama ModelSpec."""
    register(LLAMA_SPEC)
