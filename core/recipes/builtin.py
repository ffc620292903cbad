"""The engine's own plugin: the `pretrain`, `sft`, `dpo` and `orpo` recipes for causal LMs, their datasets and objectives.

Recipes select models by task, never by family: any family whose ModelSpec says
``task="causal_lm"`` trains with them, a pip-installed third-party family included.
"""

from __future__ import annotations

from nxdt import hookimpl
from nxdt.recipes.datasets import build_pretrain_dataset, build_sft_dataset
from nxdt.recipes.evaluate import sft_exact_match
from nxdt.recipes.losses import build_causal_lm_loss
from nxdt.recipes.preference import build_dpo_loss, build_orpo_loss, build_preference_dataset
from nxdt.specs import DatasetSpec, LossSpec, RecipeSpec

#: the model task the engine recipes train; other tasks bring recipes of their own (plugin API 2)
CAUSAL_LM = ("causal_lm",)


def _defaults(lr: float, warmup_steps: int, **extra: dict) -> dict:
    """Recipe defaults for full-size models; the tiny presets carry their own in hub_registry.toml."""
    return {
        "trainer": {"max_steps": 1000, "log_every_n_steps": 10, "val_check_interval": 100, "limit_val_batches": 8,
                    "gradient_clip_val": 1.0},
        "data": {"micro_batch_size": 1, "global_batch_size": 32},
        "model": {
            "optim": {
                "name": "adamw",
                "lr": lr,
                "weight_decay": 0.01,
                "betas": [0.9, 0.95],
                "sched": {"name": "CosineAnnealing", "warmup_steps": warmup_steps, "constant_steps": 0, "min_lr": lr / 10},
            }
        },
        **extra,
    }


PRETRAIN_DEFAULTS = _defaults(lr=3e-4, warmup_steps=100)
SFT_DEFAULTS = _defaults(lr=2e-5, warmup_steps=10, model_alignment_strategy={"sft": {"packing": True}})
# DPO and ORPO: TRL's betas (0.1) and small learning rates for fine-tuning a pretrained model.
# (llama3-tiny's embedded ORPO demo raises beta in the preset's recipe_defaults: a model that does not
# know the task yet learns only as fast as SFT with the odds ratio a small term beside the NLL.)
DPO_DEFAULTS = _defaults(lr=1e-6, warmup_steps=10, model_alignment_strategy={"dpo": {"kl_beta": 0.1}})
ORPO_DEFAULTS = _defaults(lr=8e-6, warmup_steps=10, model_alignment_strategy={"orpo": {"beta": 0.1}})


@hookimpl
def nxdt_register_recipes(register):
    """Register the engine recipes."""
    register(
        RecipeSpec(
            name="pretrain",
            description="causal-LM pre-training on packed text (HF datasets dir, raw text, or Megatron .bin/.idx)",
            defaults=PRETRAIN_DEFAULTS,
            dataset="pretrain",
            loss="causal_lm",
            tasks=CAUSAL_LM,
        )
    )
    register(
        RecipeSpec(
            name="sft",
            description="supervised fine-tuning on input/output or chat-message JSONL, prompt tokens masked",
            defaults=SFT_DEFAULTS,
            dataset="sft",
            loss="causal_lm",
            tasks=CAUSAL_LM,
            evaluate=sft_exact_match,
        )
    )
    register(
        RecipeSpec(
            name="dpo",
            description="direct preference optimisation on prompt/chosen/rejected pairs against a reference model",
            defaults=DPO_DEFAULTS,
            dataset="preference",
            loss="dpo",
            tasks=CAUSAL_LM,
        )
    )
    register(
        RecipeSpec(
            name="orpo",
            description="odds-ratio preference optimisation on prompt/chosen/rejected pairs (no reference model)",
            defaults=ORPO_DEFAULTS,
            dataset="preference",
            loss="orpo",
            tasks=CAUSAL_LM,
        )
    )


@hookimpl
def nxdt_register_datasets(register):
    """Register the engine datasets."""
    register(DatasetSpec("pretrain", build_pretrain_dataset, description="packed pre-training text"))
    register(DatasetSpec("sft", build_sft_dataset, description="prompt/response pairs with the prompt masked"))
    register(DatasetSpec("preference", build_preference_dataset, description="prompt/chosen/rejected preference pairs"))


@hookimpl
def nxdt_register_losses(register):
    """Register the engine losses."""
    register(LossSpec("causal_lm", build_causal_lm_loss, description="next-token cross entropy over labels != -100"))
    register(LossSpec("dpo", build_dpo_loss, description="DPO loss per preference pair (sigmoid, hinge or ipo)"))
    register(LossSpec("orpo", build_orpo_loss, description="ORPO loss per preference pair: chosen NLL and odds ratio"))
