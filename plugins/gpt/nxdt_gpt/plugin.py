"""nxdt-gpt: GPT-2 and Megatron-style GPT decoders, from the kit.

Everything generic (learned positions or RoPE, LayerNorm, GELU or SwiGLU, biases, tied
embeddings, init, the shard plan, FLOPs) comes from ``nxdt.modeling``; what is GPT's own is that
its architecture keys are read rather than pinned (config.py) and its HF forms (hf.py). The
``gpt2-tiny`` preset is registered here because its default tokenizer ships inside this package.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import resources
from pathlib import Path

from nxdt import hookimpl
from nxdt.modeling import KIT_PEFT_TARGETS, HFConfigTable, transformer_family
from nxdt.specs import ModelSpec, PresetSpec
from nxdt_gpt import hf
from nxdt_gpt.config import GPTConfig, config_from_nxdt

NXDT_PLUGIN_API = 2

#: A GPT MLP may be plain (one input projection) or gated, so only the names true of both are
#: targets: ``gate_up_proj`` is the MLP's input projection(s) either way.
GPT_PEFT_TARGETS = {k: v for k, v in KIT_PEFT_TARGETS.items() if k not in ("gate_proj", "up_proj")}

GPT_SPEC = transformer_family(
    "gpt",
    HFConfigTable(model_type="gpt2", architecture="GPT2LMHeadModel"),
    config_class=GPTConfig,
    config_from_nxdt=config_from_nxdt,
    config_from_hf=hf.config_from_hf,
    config_to_hf=hf.config_to_hf,
    state_dict_adapter=hf.state_dict_adapter,
    # llama config.json files belong to the llama family; the gpt family only writes them
    hf_model_types=("gpt2", "stablelm"),
    peft_targets=GPT_PEFT_TARGETS,
    plugin="gpt",
)


def tiny_tokenizer_path() -> Path:
    """The GPT-2 style byte-level BPE (512 tokens) shipped for ``gpt2-tiny``."""
    return Path(str(resources.files("nxdt_gpt") / "gpt2_tiny_tokenizer"))


def gpt2_tiny_preset() -> PresetSpec:
    """``gpt2-tiny``: GPT-2's shape at 0.2M parameters, with fast CPU training defaults and its own tokenizer."""
    return PresetSpec(
        name="gpt2-tiny",
        family="gpt",
        plugin="gpt",
        style="hf",
        hf_model_id="",
        description="Tiny GPT-2 shaped debug model (learned positions, biases, tied embeddings)",
        architecture={
            "vocab_size": 512, "hidden_size": 64, "num_layers": 2, "num_attention_heads": 4, "ffn_hidden_size": 256,
            "max_position_embeddings": 128, "layernorm_epsilon": 1e-5, "normalization": "layernorm",
            "position_embedding_type": "learned_absolute", "activation": "gelu_tanh", "has_bias": True,
            "share_embeddings_and_output_weights": True,
        },
        distributed_strategy={"tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1},
        reference_machine="laptop CPU, 1 process",
        seq_length=64,
        defaults={
            "trainer": {"max_steps": 250, "val_check_interval": 50, "limit_val_batches": 4},
            "data": {"micro_batch_size": 16, "global_batch_size": 32,
                     "tokenizer": {"type": str(tiny_tokenizer_path())}},
            "model": {"optim": {"lr": 3e-3, "sched": {"warmup_steps": 20, "min_lr": 3e-4}}},
        },
        source="nxdt-gpt",
    )


@hookimpl
def nxdt_register_models(register: Callable[[ModelSpec], None]) -> None:
    """Register the gpt ModelSpec."""
    register(GPT_SPEC)


@hookimpl
def nxdt_register_presets(register: Callable[[PresetSpec], None]) -> None:
    """Register gpt2-tiny (the full-size GPT-2 presets are in hub_registry.toml)."""
    register(gpt2_tiny_preset())
