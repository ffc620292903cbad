"""Runs pipeline-parallel layouts inside one torchrun process group and writes their losses as JSON.

``torchrun --nproc-per-node 4 tests/pipeline_driver.py OUT_DIR [LAYOUT ...] -- OVERRIDE ...``

Like tests/parallel_driver.py: layouts run one after another in one launch; rank 0 writes
``OUT_DIR/<layout>.json`` with the training losses, the final validation loss and, for tied
embeddings, how far the first stage's embedding is from the last stage's LM head.
"""

from __future__ import annotations

import sys
from pathlib import Path

from multirank import run_jobs, train_job

PP2 = "distributed_strategy.pipeline_model_parallel_size=2"
#: layout name -> overrides on top of the shared ones; every layout spans the 4 ranks
LAYOUTS: dict[str, list[str]] = {
    "pp2_dp2": [PP2],
    "pp2_vpp2_dp2": [PP2, "distributed_strategy.virtual_pipeline_model_parallel_size=2"],
    "pp2_tp2_sp": [
        PP2, "distributed_strategy.tensor_model_parallel_size=2", "distributed_strategy.sequence_parallel=true",
        "model.activations_checkpoint_granularity=full",
    ],
    "pp2_dp2_zero1_clip": [PP2, "distributed_strategy.zero1=true", "trainer.gradient_clip_val=0.5"],
    "pp2_dp2_tied": [PP2, "model.share_embeddings_and_output_weights=true"],
}


def run_layout(world, name: str, overrides: list[str], out_dir: Path, shared: list[str]) -> dict:
    """Train one layout; report losses, validation losses and (tied) the embedding/LM-head gap."""
    trainer, result = train_job(world, [*shared, *overrides], out_dir / "runs" / name)
    full = trainer.model.full_state_dict()  # a collective over the pipeline
    out = {"losses": result.losses, "val_losses": list(result.val_losses.values())}
    if name.endswith("tied"):
        out["tie_diff"] = float((full["output.weight"] - full["tok_embeddings.weight"]).abs().max())
    return out


if __name__ == "__main__":
    run_jobs(sys.argv[1:], LAYOUTS, run_layout)
