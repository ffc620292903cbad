"""Trains mixtral-tiny under expert-parallel layouts inside one torchrun process group (4 ranks).

``torchrun --nproc-per-node 4 tests/expert_parallel_driver.py OUT_DIR [JOB ...] -- OVERRIDE ...``

Jobs run in order in one process group (start-up paid once); a job that resumes names the job
whose step-5 checkpoint it loads. Rank 0 writes ``OUT_DIR/<job>.json``: the losses, the logged
gradient norms and MoE metrics of the last step, the run directory. tests/test_expert_parallel.py
compares them with single-process runs and with each other.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from multirank import run_jobs

EP2 = ["distributed_strategy.expert_model_parallel_size=2"]
TP2_SP = ["distributed_strategy.tensor_model_parallel_size=2", "distributed_strategy.sequence_parallel=true"]
CAPACITY = ["model.moe.capacity_factor=1.0"]
SAVE_EVERY_5 = ["exp_manager.checkpoint_callback_params.every_n_train_steps=5",
                "exp_manager.checkpoint_callback_params.save_top_k=-1"]
STEP5 = "checkpoints/nxdt--step=5-consumed_samples=40"

#: job -> (overrides on top of the shared ones, the job whose step-5 checkpoint it resumes from)
JOBS: dict[str, tuple[list[str], str | None]] = {
    "dp4_ep2": ([*EP2, *SAVE_EVERY_5], None),  # EP2 x edp2 (dropless)
    "dp2_tp2": (["distributed_strategy.tensor_model_parallel_size=2"], None),  # TP experts, no EP
    "dp2_ep2_tp2_sp": ([*EP2, *TP2_SP], None),  # experts tensor-parallel inside each EP rank, SP
    "pp2_dp2_ep2": ([*EP2, "distributed_strategy.pipeline_model_parallel_size=2"], None),
    "dp4_ep2_zero1_clip": ([*EP2, "distributed_strategy.zero1=true"], None),  # clipping is in the shared overrides
    "dp4_ep2_full_recompute": ([*EP2, "model.activations_checkpoint_granularity=full"], None),
    "dp4_ep2_mixed": ([*EP2, "distributed_strategy.zero1=true", "precision.type=mixed_precision"], None),
    "dp4_ep2_bf16sr": ([*EP2, "precision.type=bf16SR"], None),  # flat optimizer without ZeRO-1
    "cap_dp4_ep1": (CAPACITY, None),
    "cap_dp4_ep2": ([*CAPACITY, *EP2], None),
    "resume_dp4_ep2": (EP2, "dp4_ep2"),  # same layout: bitwise
    "resume_dp4_ep1": ([], "dp4_ep2"),  # experts from two EP ranks into every rank
    "resume_dp2_ep2_tp2": ([*EP2, *TP2_SP], "dp4_ep2"),
    "resume_pp2_ep2": ([*EP2, "distributed_strategy.pipeline_model_parallel_size=2"], "dp4_ep2"),
}


def train(world, overrides: list[str], run_dir: Path):
    """Train mixtral-tiny's sft recipe with ``overrides`` on ``world``; returns the Trainer and result."""
    from nxdt.resolve import resolve
    from nxdt.train.trainer import Trainer

    trainer = Trainer(resolve("mixtral-tiny", "sft", [*overrides, f"exp_manager.explicit_log_dir={run_dir}"]), world)
    return trainer, trainer.fit()


def run_job(world, name: str, job: tuple[list[str], str | None], out_dir: Path, shared: list[str]) -> dict:
    """Train one job (resuming from its source's step-5 checkpoint when it has one); report what tests compare."""
    overrides, source = job
    run_dir = out_dir / "runs" / name
    resume = [f"exp_manager.resume_from_checkpoint={out_dir / 'runs' / source / STEP5}"] if source else []
    trainer, result = train(world, [*shared, *overrides, *resume], run_dir)
    full = trainer.model.full_state_dict()  # a collective: every rank takes part
    out: dict = {"losses": result.losses, "run_dir": str(run_dir)}
    out["w1_norm"] = float(full["layers.1.feed_forward.experts.w1"].norm())
    if world.rank == 0:
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        steps = [r for r in rows if "loss" in r]
        out["grad_norms"] = [r.get("grad_norm") for r in steps]
        out["last"] = steps[-1]
    return out


if __name__ == "__main__":
    run_jobs(sys.argv[1:], JOBS, run_job)
