"""gpt2-tiny under the parallel layouts, inside one torchrun process group; losses as JSON.

``torchrun --nproc-per-node 4 plugins/gpt/tests/gpt_driver.py OUT_DIR [JOB ...] -- OVERRIDE ...``

Jobs run one after another in the same process group (start-up paid once), each over the whole
world (DP takes what TP x PP leaves); a job that resumes names the job whose step-4 checkpoint it
loads. Rank 0 writes ``OUT_DIR/<job>.json``. test_gpt_parallel.py compares them with one process.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO / "tests"))  # the shared multi-rank harness (tests/multirank.py)

from multirank import run_jobs  # noqa: E402

TP2_SP = ["distributed_strategy.tensor_model_parallel_size=2", "distributed_strategy.sequence_parallel=true"]
PP2 = ["distributed_strategy.pipeline_model_parallel_size=2"]
ZERO1 = ["distributed_strategy.zero1=true"]
SAVE_AT_4 = ["exp_manager.checkpoint_callback_params.every_n_train_steps=4",
             "exp_manager.checkpoint_callback_params.save_top_k=-1"]
STEP4 = "checkpoints/nxdt--step=4-consumed_samples=32"
#: job -> (overrides on top of the shared ones, the job whose step-4 checkpoint it resumes from).
#: gpt2-tiny ties its embeddings, so every pipeline job keeps the tie across stages.
JOBS: dict[str, tuple[list[str], str | None]] = {
    "dp2_tp2_sp": ([*TP2_SP, "model.activations_checkpoint_granularity=selective",
                    "model.activations_checkpoint_recompute=[CoreAttention]"], None),
    "pp2_dp2": ([*PP2, "model.activations_checkpoint_granularity=full"], None),
    "pp2_vpp2_dp2": ([*PP2, "distributed_strategy.virtual_pipeline_model_parallel_size=2"], None),
    "pp2_dp2_zero1": ([*PP2, *ZERO1, *SAVE_AT_4], None),
    # the PP2 x DP2 + ZeRO-1 checkpoint, resumed as it was saved and resharded onto DP2 x TP2 + SP
    "resume_pp2_dp2_zero1": ([*PP2, *ZERO1], "pp2_dp2_zero1"),
    "resume_as_dp2_tp2_sp": (TP2_SP, "pp2_dp2_zero1"),
}


def train(world: Any, overrides: list[str], run_dir: Path) -> Any:
    """Train gpt2-tiny's sft recipe with ``overrides`` on ``world``; returns the Trainer and its result."""
    from nxdt.resolve import resolve
    from nxdt.train.trainer import Trainer

    trainer = Trainer(resolve("gpt2-tiny", "sft", [*overrides, f"exp_manager.explicit_log_dir={run_dir}"]), world)
    return trainer, trainer.fit()


def run_job(world: Any, name: str, job: tuple[list[str], str | None], out_dir: Path, shared: list[str]) -> dict:
    """Train one job; report its losses, run directory and the gap between the tied embedding and LM head."""
    overrides, source = job
    resume = [f"exp_manager.resume_from_checkpoint={out_dir / 'runs' / source / STEP4}"] if source else []
    trainer, result = train(world, [*shared, *overrides, *resume], out_dir / "runs" / name)
    full = trainer.model.full_state_dict()  # a collective: every rank takes part
    embedding = full["tok_embeddings.weight"]
    # Without pipeline stages a tied head is the embedding itself and is saved once, under its name.
    head = full.get("output.weight", embedding)
    return {"losses": result.losses, "run_dir": str(out_dir / "runs" / name),
            "tie_diff": float((head - embedding).abs().max())}


if __name__ == "__main__":
    run_jobs(sys.argv[1:], JOBS, run_job)
