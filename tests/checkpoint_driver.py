"""Saves and loads checkpoints across parallel layouts inside one torchrun process group.

``torchrun --nproc-per-node 4 tests/checkpoint_driver.py OUT_DIR [JOB ...] -- OVERRIDE ...``

Jobs run in order in the same process group (start-up paid once); a job that resumes names the
job whose step-4 checkpoint it loads. Rank 0 writes ``OUT_DIR/<job>.json`` with the job's losses,
its run directory, the bytes each rank read when it resumed and, for tied embeddings, how far the LM head is from the embedding.
tests/test_checkpoint_layouts.py compares the DP/TP jobs (the default), tests/test_checkpoint_pipeline.py
the pipeline ones (they need 4 layers).
"""

from __future__ import annotations

import sys
from pathlib import Path

from multirank import run_jobs, train_job

DP2_TP2_ZERO1 = ["distributed_strategy.tensor_model_parallel_size=2", "distributed_strategy.zero1=true"]
SAVE_EVERY_4 = ["exp_manager.checkpoint_callback_params.every_n_train_steps=4",
                "exp_manager.checkpoint_callback_params.save_top_k=-1"]
MIXED = ["precision.type=mixed_precision"]
#: job -> (overrides on top of the shared ones, the job whose step-4 checkpoint it resumes from)
JOBS: dict[str, tuple[list[str], str | None]] = {
    "ref": ([*DP2_TP2_ZERO1, *SAVE_EVERY_4], None),
    "to_dp4_zero1": (["distributed_strategy.zero1=true"], "ref"),
    "to_tp4_kv2": (["distributed_strategy.tensor_model_parallel_size=4"], "ref"),
    "mixed_ref": ([*DP2_TP2_ZERO1, *MIXED, *SAVE_EVERY_4], None),
    "mixed_resume": ([*DP2_TP2_ZERO1, *MIXED], "mixed_ref"),
    "kv1": ([*DP2_TP2_ZERO1, "model.num_kv_heads=1", *SAVE_EVERY_4], None),
}
PP2 = ["distributed_strategy.pipeline_model_parallel_size=2"]
TIED = ["model.share_embeddings_and_output_weights=true"]
#: pipeline jobs: a PP2 x DP2 + ZeRO-1 checkpoint resumed under PP2 x DP2 (also with one DP rank
#: reading), PP4 x DP1 with torch AdamW; a tied-embedding PP2 x DP2 checkpoint resumed under PP2 x DP2
PIPELINE_JOBS: dict[str, tuple[list[str], str | None]] = {
    "pp2_ref": ([*PP2, "distributed_strategy.zero1=true", *SAVE_EVERY_4], None),
    "pp2_resume": ([*PP2, "distributed_strategy.zero1=true"], "pp2_ref"),
    "pp2_one_dp_rank": ([*PP2, "distributed_strategy.zero1=true", "exp_manager.load_from_one_dp_rank=true"], "pp2_ref"),
    "pp4_resume": (["distributed_strategy.pipeline_model_parallel_size=4"], "pp2_ref"),
    "pp2_tied_ref": ([*PP2, *TIED, *SAVE_EVERY_4], None),
    "pp2_tied_resume": ([*PP2, *TIED], "pp2_tied_ref"),
}
STEP4 = "checkpoints/nxdt--step=4-consumed_samples=32"


def run_job(world, name: str, job: tuple[list[str], str | None], out_dir: Path, shared: list[str]) -> dict:
    """Train one job, resuming from its source job's step-4 checkpoint when it has one."""
    import torch

    overrides, source = job
    run_dir = out_dir / "runs" / name
    resume = [f"exp_manager.resume_from_checkpoint={out_dir / 'runs' / source / STEP4}"] if source else []
    trainer, result = train_job(world, [*shared, *overrides, *resume], run_dir)
    out = {"losses": result.losses, "run_dir": str(run_dir)}
    if TIED[0] in overrides:
        full = trainer.model.full_state_dict()  # a collective over the pipeline
        out["tie_diff"] = float((full["output.weight"] - full["tok_embeddings.weight"]).abs().max())
    if source:
        bytes_read: list[int] = [0] * world.world_size
        torch.distributed.all_gather_object(bytes_read, trainer.checkpointer.last_load.bytes_read)
        out["bytes_read"] = bytes_read
    return out


if __name__ == "__main__":
    run_jobs(sys.argv[1:], {**JOBS, **PIPELINE_JOBS}, run_job, default=list(JOBS))
