"""Trains bert-tiny under several parallel layouts inside one torchrun process group.

``torchrun --nproc-per-node 4 plugins/bert/tests/bert_driver.py OUT_DIR [JOB ...] -- OVERRIDE ...``

Jobs run one after another in the same process group (start-up paid once); a job that resumes
names the job whose step-5 checkpoint it loads. Rank 0 writes ``OUT_DIR/<job>.json`` with the
training losses, the validation metrics of the last step and the run directory.
plugins/bert/tests/test_bert_parallel.py compares them with single-process references.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "tests"))

from multirank import run_jobs  # noqa: E402

TP2 = ["distributed_strategy.tensor_model_parallel_size=2"]
SP = ["distributed_strategy.sequence_parallel=true"]
PP2 = ["distributed_strategy.pipeline_model_parallel_size=2"]
VPP2 = ["distributed_strategy.virtual_pipeline_model_parallel_size=2"]
NSP = ["model.bert_binary_head=true"]
FOUR_LAYERS = ["model.num_layers=4"]
SAVE_EVERY_5 = ["exp_manager.checkpoint_callback_params.every_n_train_steps=5",
                "exp_manager.checkpoint_callback_params.save_top_k=-1"]
ZERO1 = ["distributed_strategy.zero1=true"]
#: job -> (overrides on top of the shared ones, the job whose step-5 checkpoint it resumes from)
JOBS: dict[str, tuple[list[str], str | None]] = {
    "dp2_tp2": (TP2, None),
    "pp2_dp2": ([*PP2, *SAVE_EVERY_5], None),
    "pp2_dp2_resume": (PP2, "pp2_dp2"),
    "dp2_tp2_sp_nsp": ([*TP2, *SP, *NSP, *SAVE_EVERY_5], None),
    "pp2_zero1_recompute_resume": ([*PP2, *ZERO1, "model.activations_checkpoint_granularity=full", *NSP], "dp2_tp2_sp_nsp"),
    "pp2_vpp2_nsp": ([*PP2, *VPP2, *NSP, *FOUR_LAYERS], None),
    "dp4_zero1_mixed": ([*ZERO1, "precision.type=mixed_precision"], None),
}
STEP5 = "checkpoints/nxdt--step=5-consumed_samples=40"


def run_job(world, name: str, job: tuple[list[str], str | None], out_dir: Path, shared: list[str]) -> dict:
    """Train one job (resuming from its source job's step-5 checkpoint when it has one); report losses and metrics."""
    from nxdt.resolve import resolve
    from nxdt.train.trainer import Trainer

    overrides, source = job
    run_dir = out_dir / "runs" / name
    resume = [f"exp_manager.resume_from_checkpoint={out_dir / 'runs' / source / STEP5}"] if source else []
    run = resolve("bert-tiny", "pretrain", [*shared, *overrides, *resume, f"exp_manager.explicit_log_dir={run_dir}"])
    result = Trainer(run, world).fit()
    return {"losses": result.losses, "val": result.val_losses, "run_dir": str(run_dir)}


if __name__ == "__main__":
    run_jobs(sys.argv[1:], JOBS, run_job)
