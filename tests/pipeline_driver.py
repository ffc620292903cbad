"""Runs pipeline-parallel layouts inside one torchrun process group and writes their losses as JSON.

``torchrun --nproc-per-node 4 tests/pipeline_driver.py OUT_DIR [LAYOUT ...] -- OVERRIDE ...``

Like tests/parallel_driver.py: layouts run one after another in one launch; rank 0 writes
``OUT_DIR/<layout>.json`` with the training losses, the final validation loss and, for tied
embeddings, how far the first stage's embedding is from the last stage's LM head.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

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


def main(argv: list[str]) -> None:
    """Run the layouts named in ``argv`` (all by default) and write their results."""
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
        full = trainer.model.full_state_dict()  # a collective over the pipeline
        if world.rank == 0:
            out = {"losses": result.losses, "val_losses": list(result.val_losses.values())}
            if name.endswith("tied"):
                out["tie_diff"] = float((full["output.weight"] - full["tok_embeddings.weight"]).abs().max())
            (out_dir / f"{name}.json").write_text(json.dumps(out))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
