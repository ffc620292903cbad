"""One training process: what `nxdt run` executes in-process or in each torchrun worker."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from nxdt.errors import NxdtError


def train(argv: Sequence[str]):
    """Resolve the run from ``argv`` (target, --recipe, overrides), join the world and train."""
    from nxdt.parallel.world import init_world, shutdown
    from nxdt.resolve import resolve
    from nxdt.train.trainer import Trainer

    parser = argparse.ArgumentParser(prog="nxdt-worker")
    parser.add_argument("target")
    parser.add_argument("--recipe")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(list(argv))
    resolved = resolve(args.target, args.recipe, args.overrides)
    world = init_world()
    try:
        result = Trainer(resolved, world).fit()
        if world.is_main:
            summary = {"run_dir": result.run_dir, "final_loss": result.losses[-1] if result.losses else None,
                       "val_losses": result.val_losses, **result.metrics}
            with open(os.path.join(result.run_dir, "result.json"), "w") as f:
                json.dump(summary, f, indent=2)
        return result
    finally:
        shutdown(world)


def main() -> int:
    """Worker entry point under torchrun: user errors become one line and a non-zero exit."""
    try:
        train(sys.argv[1:])
    except NxdtError as exc:
        if os.environ.get("NXDT_DEBUG"):
            raise
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"nxdt: error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
