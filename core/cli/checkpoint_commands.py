"""`nxdt checkpoints RUN_DIR` (list with step, completeness, size) and `nxdt export CKPT --to hf DIR`."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from typing import Any

from nxdt.errors import NxdtError


def add_parsers(sub: argparse._SubParsersAction, add_common: Callable[[argparse.ArgumentParser], None]) -> None:
    """Register `checkpoints` and `export`."""
    p = sub.add_parser("checkpoints", help="list a run's checkpoints: step, completeness, size")
    p.add_argument("location", help="a run directory, a checkpoint root, or an s3:// checkpoint root")
    add_common(p)
    p = sub.add_parser("export", help="convert a checkpoint (any parallel layout) to a transformers or PEFT directory")
    p.add_argument("checkpoint", help="a checkpoint directory (local or s3://)")
    p.add_argument("--to", choices=["hf", "peft"], default="hf",
                   help="hf: config.json + safetensors (LoRA merged); peft: a LoRA checkpoint's adapters in PEFT's format")
    p.add_argument("out_dir", help="where to write the files (and the run's tokenizer files)")
    p.add_argument("--max-shard-size", type=float, default=2.0, help="GiB per safetensors file (default 2)")
    add_common(p)


def dispatch(args: argparse.Namespace) -> int | None:
    """Run the command if it is one of these; None otherwise."""
    if args.command == "checkpoints":
        return cmd_checkpoints(args)
    if args.command == "export":
        return cmd_export(args)
    return None


def _root_of(location: str) -> str:
    """A run directory's ``checkpoints/`` (or the checkpoint_dir its config names), else ``location``."""
    if "://" in location:
        return location
    config = os.path.join(location, "config.yaml")
    if os.path.isfile(config):
        import yaml

        try:
            with open(config, encoding="utf-8") as f:
                data = yaml.safe_load(f)
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            data = None  # an unreadable config.yaml: fall back to the default place
        em = data.get("exp_manager") if isinstance(data, dict) else None
        root = em.get("checkpoint_dir") if isinstance(em, dict) else None
        return root if isinstance(root, str) and root else os.path.join(location, "checkpoints")
    sub = os.path.join(location, "checkpoints")
    return sub if os.path.isdir(sub) else location


def cmd_checkpoints(args: argparse.Namespace) -> int:
    """List checkpoints."""
    from nxdt.checkpoint.layout import list_checkpoints
    from nxdt.checkpoint.store import Store

    if "://" not in args.location and not os.path.isdir(args.location):
        what = "is not a directory" if os.path.exists(args.location) else "does not exist"
        raise NxdtError(f"{args.location} {what} (a run directory or checkpoint root is expected)")
    root = _root_of(args.location)
    infos = list_checkpoints(Store(root))
    if args.json:
        print(json.dumps({"root": root, "checkpoints": [i.as_dict() for i in infos]}, indent=2))
        return 0
    if not infos:
        print(f"no checkpoints in {root}")
        return 0
    print(f"{'step':>8}  {'samples':>10}  {'complete':8}  {'size':>10}  name")
    for i in infos:
        step = "-" if i.step is None else str(i.step)
        samples = "-" if i.consumed_samples is None else str(i.consumed_samples)
        print(f"{step:>8}  {samples:>10}  {'yes' if i.complete else 'NO':8}  {_human(i.size_bytes):>10}  {i.name}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Export a checkpoint to HF or PEFT format."""
    from nxdt.checkpoint.hf_export import export_hf, export_peft

    if args.to == "peft":
        peft_summary = export_peft(args.checkpoint, args.out_dir)
        if args.json:
            print(json.dumps(peft_summary, indent=2))
        else:
            print(f"exported the LoRA adapters of step {peft_summary['step']} ({peft_summary['family']}, targets "
                  f"{', '.join(peft_summary['target_modules'])}) to {peft_summary['out_dir']}")
        return 0
    if args.max_shard_size <= 0:
        raise NxdtError("--max-shard-size must be positive")
    summary: dict[str, Any] = export_hf(args.checkpoint, args.out_dir, int(args.max_shard_size * (1 << 30)))
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"exported step {summary['step']} ({summary['family']}, {summary['tensors']} tensors, "
              f"{summary['shards']} safetensors file(s)) to {summary['out_dir']}")
    return 0


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)
