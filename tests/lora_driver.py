"""Runs LoRA under several parallel layouts inside one torchrun process group; writes each one's losses.

``torchrun --nproc-per-node 4 tests/lora_driver.py OUT_DIR [LAYOUT ...] -- OVERRIDE ...``
(see tests/parallel_driver.py); tests/test_lora.py compares them with one process.
"""

from __future__ import annotations

import sys
from pathlib import Path

from multirank import run_jobs, train_job

TP2 = "distributed_strategy.tensor_model_parallel_size=2"
LAYOUTS: dict[str, list[str]] = {
    "dp2_tp2_sp": [TP2, "distributed_strategy.sequence_parallel=true"],
    "dp2_tp2_kv1": [TP2, "model.num_kv_heads=1"],
    "pp2_dp2": ["distributed_strategy.pipeline_model_parallel_size=2"],
    "dp4_zero1": ["distributed_strategy.zero1=true"],
}


def run_layout(world, name: str, overrides: list[str], out_dir: Path, shared: list[str]) -> dict:
    """Train one layout; report its losses and which parameters the optimizer updates."""
    trainer, result = train_job(world, [*shared, *overrides], out_dir / "runs" / name)
    trainable = sorted(r.name for r in trainer.model.records.trainable())
    return {"losses": result.losses, "trainable": trainable}


if __name__ == "__main__":
    run_jobs(sys.argv[1:], LAYOUTS, run_layout)
