"""Runs DPO and ORPO under several parallel layouts inside one torchrun process group; writes each one's losses.

``torchrun --nproc-per-node 4 tests/dpo_driver.py OUT_DIR [JOB ...] -- OVERRIDE ...`` (see
tests/multirank.py); tests/test_dpo_parallel.py compares them with one process.
"""

from __future__ import annotations

import sys
from pathlib import Path

from multirank import run_jobs

TP2 = "distributed_strategy.tensor_model_parallel_size=2"
PP2 = "distributed_strategy.pipeline_model_parallel_size=2"
LIVE = "model_alignment_strategy.dpo.precompute_ref_log_probs=false"
LORA = ["model_alignment_strategy.peft.lora_rank=4", "model_alignment_strategy.peft.lora_dropout=0"]
#: job -> (recipe, overrides)
JOBS: dict[str, tuple[str, list[str]]] = {
    "dpo_dp2_tp2": ("dpo", [TP2]),
    "dpo_live_dp2_tp2_sp": ("dpo", [TP2, "distributed_strategy.sequence_parallel=true", LIVE]),
    "dpo_pp2_dp2": ("dpo", [PP2]),
    "dpo_live_pp2_dp2": ("dpo", [PP2, LIVE]),
    "dpo_dp4_zero1": ("dpo", ["distributed_strategy.zero1=true"]),
    "dpo_lora_dp2_tp2": ("dpo", [TP2, LIVE, *LORA]),
    "orpo_dp2_tp2": ("orpo", [TP2]),
    "orpo_pp2_dp2": ("orpo", [PP2]),
}


def run_job(world, name: str, job: tuple[str, list[str]], out_dir: Path, shared: list[str]) -> dict:
    """Train one job; report its losses, final validation metrics and how its reference was made."""
    from nxdt.resolve import resolve
    from nxdt.train.trainer import Trainer

    recipe, overrides = job
    run_dir = out_dir / "runs" / name
    trainer = Trainer(resolve("llama3-tiny", recipe, [*shared, *overrides, f"exp_manager.explicit_log_dir={run_dir}"]),
                      world)
    result = trainer.fit()
    val = trainer.validate()
    reference = getattr(trainer.objective, "reference", None)
    return {"losses": result.losses, "val": val, "reference": getattr(reference, "mode", None),
            "second_model": getattr(reference, "model", None) is not None}


if __name__ == "__main__":
    run_jobs(sys.argv[1:], JOBS, run_job)
