"""Runs several parallel layouts inside one torchrun process group and writes their losses as JSON.

``torchrun --nproc-per-node 4 tests/parallel_driver.py OUT_DIR [LAYOUT ...] -- OVERRIDE ...``

Layouts run one after another in the same process group (one launch: start-up paid once); rank 0
writes ``OUT_DIR/<layout>.json``. tests/test_parallel.py compares them with single-process references.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

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


def main(argv: list[str]) -> None:
    """Run the layouts named in ``argv`` (all by default) and write their losses."""
    import torch

    from nxdt.parallel.world import init_world
    from nxdt.resolve import resolve
    from nxdt.train.trainer import Trainer

    sep = argv.index("--") if "--" in argv else len(argv)
    out_dir, names, shared = Path(argv[0]), argv[1:sep] or list(LAYOUTS), argv[sep + 1 :]
    world = init_world()
    for name in names:
        overrides = [*shared, *LAYOUTS[name], f"exp_manager.explicit_log_dir={out_dir / 'runs' / name}"]
        torch.manual_seed(0)
        trainer = Trainer(resolve("llama3-tiny", "sft", overrides), world)
        result = trainer.fit()
        # The unsharded weights after training (a collective), KV heads once, to compare with one process.
        full = trainer.model.full_state_dict()
        if world.rank == 0:
            extra = {"wk_norm": float(full["layers.0.attention.wk.weight"].norm())}
            (out_dir / f"{name}.json").write_text(json.dumps({"losses": result.losses, **extra}))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
