"""Runs several parallel layouts inside one torchrun process group and writes their losses as JSON.

``torchrun --nproc-per-node 4 tests/parallel_driver.py OUT_DIR [LAYOUT ...] -- OVERRIDE ...``

Layouts run one after another in the same process group (one launch: start-up paid once); rank 0
writes ``OUT_DIR/<layout>.json``. tests/test_parallel.py compares them with single-process references.
"""

from __future__ import annotations

import sys
from pathlib import Path

from multirank import run_jobs, train_job

#: layout name -> overrides on top of the shared ones; every layout spans the whole world (4 ranks),
#: DP taking what TP leaves. Sub-world layouts would need every world-wide collective of the trainer
#: (checkpoint groups, run directory) to be confined to them.
LAYOUTS: dict[str, list[str]] = {
    "dp2_tp2": ["distributed_strategy.tensor_model_parallel_size=2"],
    "dp2_tp2_sp": ["distributed_strategy.tensor_model_parallel_size=2", "distributed_strategy.sequence_parallel=true"],
    "tp4_kv2": ["distributed_strategy.tensor_model_parallel_size=4", "distributed_strategy.sequence_parallel=true"],
    "dp2_tp2_kv1": ["distributed_strategy.tensor_model_parallel_size=2", "model.num_kv_heads=1"],
    "dp4_zero1": ["distributed_strategy.zero1=true"],
    "dp2_tp2_zero1_clip": [
        "distributed_strategy.tensor_model_parallel_size=2", "distributed_strategy.zero1=true", "trainer.gradient_clip_val=0.5",
    ],
    "dp4_zero1_mixed": ["distributed_strategy.zero1=true", "precision.type=mixed_precision", "trainer.max_steps=50"],
    "dp2_tp2_bf16sr": ["distributed_strategy.tensor_model_parallel_size=2", "precision.type=bf16SR", "trainer.max_steps=50"],
}


def run_layout(world, name: str, overrides: list[str], out_dir: Path, shared: list[str]) -> dict:
    """Train one layout; report its losses and the trained K projection's norm (KV heads once)."""
    trainer, result = train_job(world, [*shared, *overrides], out_dir / "runs" / name)
    full = trainer.model.full_state_dict()  # a collective: every rank takes part
    return {"losses": result.losses, "wk_norm": float(full["layers.0.attention.wk.weight"].norm())}


if __name__ == "__main__":
    run_jobs(sys.argv[1:], LAYOUTS, run_layout)
