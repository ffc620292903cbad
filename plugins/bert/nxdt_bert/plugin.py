"""nxdt-bert: the BERT encoder (BertForPreTraining / BertForMaskedLM) and its masked-LM pre-training recipe.

The encoder is built from kit parts (post-LN blocks, bidirectional attention with the padding
mask, GELU); what is BERT's own is its embeddings (learned positions, token types), its heads, its
HF forms, the masked-LM data (15% of tokens masked: 80% [MASK], 10% random, 10% unchanged; optional
sentence pairs for next-sentence prediction) and the objective. ``bert-tiny`` is registered here
because its WordPiece tokenizer ships inside this package; bert-base and bert-large are in
hub_registry.toml.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import resources
from pathlib import Path

from nxdt import hookimpl
from nxdt.modeling import CoreAttention
from nxdt.specs import DatasetSpec, LossSpec, ModelSpec, PresetSpec, RecipeSpec
from nxdt_bert import hf
from nxdt_bert.config import config_from_nxdt
from nxdt_bert.model import (
    BertConfig,
    build_bert,
    flops_per_token,
    init_bert,
    num_parameters,
    pipeline_blocks,
)
from nxdt_bert.sharding import shard_plan

NXDT_PLUGIN_API = 2
MASKED_LM = "masked_lm"

BERT_SPEC = ModelSpec(
    family="bert",
    config_class=BertConfig,
    build_model=build_bert,
    init_weights=init_bert,
    config_from_nxdt=config_from_nxdt,
    config_from_hf=hf.config_from_hf,
    config_to_hf=hf.config_to_hf,
    shard_plan=shard_plan,
    state_dict_adapter=hf.state_dict_adapter,
    flops_per_token=flops_per_token,
    hf_model_types=("bert",),
    hf_architecture=hf.PRETRAINING,
    task=MASKED_LM,
    pipeline_blocks=pipeline_blocks,
    peft_targets={
        "qkv_proj": ["layers.*.attention.wq", "layers.*.attention.wk", "layers.*.attention.wv", "layers.*.attention.wqkv"],
        "q_proj": ["layers.*.attention.wq"],
        "k_proj": ["layers.*.attention.wk"],
        "v_proj": ["layers.*.attention.wv"],
        "o_proj": ["layers.*.attention.wo"],
        "up_proj": ["layers.*.feed_forward.w1"],
        "down_proj": ["layers.*.feed_forward.w2"],
    },
    recompute_modules={"CoreAttention": CoreAttention},
    plugin="bert",
    inputs=("input_ids", "attention_mask", "token_type_ids", "position_ids"),
    # the padding mask shapes attention in every block; token types and positions are embedded on the first stage
    stage_inputs=("attention_mask",),
    num_parameters=num_parameters,
    default_recipe="pretrain",
)


def tokenizer_path() -> Path:
    """The WordPiece tokenizer (lower-cased, trained on the embedded corpus) shipped for ``bert-tiny``."""
    return Path(str(resources.files("nxdt_bert") / "tokenizer"))


def bert_tiny_preset() -> PresetSpec:
    """``bert-tiny``: BERT's shape at 0.15M parameters, masked-LM only, with fast CPU defaults and its own tokenizer."""
    return PresetSpec(
        name="bert-tiny",
        family="bert",
        plugin="bert",
        style="hf",
        hf_model_id="",
        description="Tiny BERT encoder for masked-LM debug runs (its own WordPiece tokenizer)",
        architecture={
            "vocab_size": 512, "hidden_size": 64, "num_layers": 2, "num_attention_heads": 4, "ffn_hidden_size": 256,
            "max_position_embeddings": 128, "type_vocab_size": 2, "layernorm_epsilon": 1e-12,
            "normalization": "layernorm", "activation": "gelu", "has_bias": True,
            "share_embeddings_and_output_weights": True, "bert_binary_head": False,
            "hidden_dropout": 0.0, "attention_dropout": 0.0,
        },
        distributed_strategy={"tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1},
        reference_machine="laptop CPU, 1 process",
        seq_length=64,
        defaults={
            # ~30 s of one CPU core: masked-token accuracy ~35% (chance is 1/512, always "the" ~10%)
            "trainer": {"max_steps": 500, "val_check_interval": 100, "limit_val_batches": 4},
            "data": {"micro_batch_size": 32, "global_batch_size": 32, "tokenizer": {"type": str(tokenizer_path())}},
            "model": {"optim": {"lr": 5e-3, "weight_decay": 0.01, "betas": [0.9, 0.98],
                                "sched": {"warmup_steps": 30, "min_lr": 5e-4}}},
        },
        source="nxdt-bert",
    )


@hookimpl
def nxdt_register_models(register: Callable[[ModelSpec], None]) -> None:
    """Register the bert ModelSpec."""
    register(BERT_SPEC)


@hookimpl
def nxdt_register_presets(register: Callable[[PresetSpec], None]) -> None:
    """Register bert-tiny (bert-base and bert-large are in hub_registry.toml)."""
    register(bert_tiny_preset())


#: defaults for full-size models (the original BERT recipe's optimizer, a shorter schedule); bert-tiny has its own
PRETRAIN_DEFAULTS = {
    "trainer": {"max_steps": 10000, "log_every_n_steps": 10, "val_check_interval": 500, "limit_val_batches": 8,
                "gradient_clip_val": 1.0},
    "data": {"micro_batch_size": 8, "global_batch_size": 256},
    "model": {
        "optim": {
            "name": "adamw",
            "lr": 1e-4,
            "weight_decay": 0.01,
            "betas": [0.9, 0.999],
            "sched": {"name": "CosineAnnealing", "warmup_steps": 1000, "constant_steps": 0, "min_lr": 1e-5},
        }
    },
}


@hookimpl
def nxdt_register_recipes(register: Callable[[RecipeSpec], None]) -> None:
    """Register masked-LM ``pretrain`` (the name the causal recipe has, for the masked_lm task)."""
    register(
        RecipeSpec(
            name="pretrain",
            description="masked-LM pre-training (15% of tokens masked; sentence pairs for NSP with bert_binary_head) "
            "on text, an HF datasets directory or Megatron .bin/.idx",
            defaults=PRETRAIN_DEFAULTS,
            dataset=MASKED_LM,
            loss=MASKED_LM,
            tasks=(MASKED_LM,),
        )
    )


@hookimpl
def nxdt_register_datasets(register: Callable[[DatasetSpec], None]) -> None:
    """Register the masked-LM dataset builder."""
    from nxdt_bert.data import build_masked_lm_dataset

    register(DatasetSpec(MASKED_LM, build_masked_lm_dataset, description="BERT samples, 15% of tokens masked"))


@hookimpl
def nxdt_register_losses(register: Callable[[LossSpec], None]) -> None:
    """Register the masked-LM objective."""
    from nxdt_bert.objective import build_masked_lm_objective

    register(LossSpec(MASKED_LM, build_masked_lm_objective, description="masked-token cross entropy (+ NSP)"))
