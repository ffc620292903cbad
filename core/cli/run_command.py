"""`nxdt run`: resolve the run, then train in this process or launch torchrun workers."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable

from nxdt.errors import NxdtError

WORKER_MODULE = "nxdt.cli.worker"


def add_parser(sub: argparse._SubParsersAction, add_common: Callable[[argparse.ArgumentParser], None]) -> None:
    """Register `nxdt run` and its launch options (named as torchrun names them)."""
    p = sub.add_parser("run", help="train a preset or an NxDT YAML config")
    p.add_argument("target", help="a preset name (see `nxdt list`) or a YAML config file")
    p.add_argument("overrides", nargs="*", help="key.path=value overrides, applied last")
    p.add_argument("--recipe", help="pretrain | sft | a plugin's recipe (default: sft for presets, pretrain for YAML without SFT keys)")
    p.add_argument("--nproc-per-node", "--nproc_per_node", dest="nproc_per_node", type=int, help="workers per node (default: trainer.devices)")
    p.add_argument("--nnodes", type=str, help="nodes, or MIN:MAX for elastic runs (default: trainer.num_nodes)")
    p.add_argument("--node-rank", "--node_rank", dest="node_rank", type=int, default=None, help="this node's rank (static rendezvous)")
    p.add_argument("--rdzv-endpoint", "--rdzv_endpoint", dest="rdzv_endpoint", help="host:port of the c10d rendezvous")
    p.add_argument("--rdzv-id", "--rdzv_id", dest="rdzv_id", default=None, help="rendezvous id shared by all nodes of a job")
    p.add_argument("--max-restarts", "--max_restarts", dest="max_restarts", type=int, default=0, help="worker group restarts on failure")
    p.add_argument("--dry-run", action="store_true", help="resolve and print the run, then exit")
    add_common(p)


def dispatch(args: argparse.Namespace) -> int:
    """Run the `run` command."""
    from nxdt.resolve import resolve

    overrides = list(args.overrides)
    if args.nproc_per_node:
        overrides.append(f"trainer.devices={args.nproc_per_node}")
    if args.nnodes and ":" not in args.nnodes:
        overrides.append(f"trainer.num_nodes={int(args.nnodes)}")
    recipe = args.recipe or default_recipe(args.target)
    resolved = resolve(args.target, recipe, overrides)
    cfg = resolved.config
    nproc = cfg.trainer.devices or 1
    nnodes = args.nnodes or str(cfg.trainer.num_nodes or 1)
    world_size = nproc * int(nnodes.split(":")[-1])
    parallel = resolved.parallel_dims(world_size)
    if args.dry_run:
        return print_dry_run(resolved, parallel, world_size, nproc, nnodes, args.json)
    worker_args = ["--recipe", recipe, args.target, *overrides]
    if world_size == 1 and "LOCAL_RANK" not in os.environ:
        from nxdt.cli.worker import train

        train(worker_args)
        return 0
    return launch_torchrun(args, nproc, nnodes, worker_args)


def default_recipe(target: str) -> str:
    """``sft`` for presets; for YAML files, ``sft`` when it configures model_alignment_strategy.sft."""
    from nxdt.resolve import is_config_file

    if not is_config_file(target):
        return "sft"
    from nxdt.config import load_yaml

    layer = load_yaml(target)
    return "sft" if (layer.get("model_alignment_strategy") or {}).get("sft") is not None else "pretrain"


def launch_torchrun(args: argparse.Namespace, nproc: int, nnodes: str, worker_args: list[str]) -> int:
    """Start the workers through torchrun's elastic launcher (``torch.distributed.run``)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    launch = ["--nproc-per-node", str(nproc), "--nnodes", nnodes, "--max-restarts", str(args.max_restarts)]
    if nnodes == "1" and not args.rdzv_endpoint:
        launch.append("--standalone")
    else:
        if not args.rdzv_endpoint:
            raise NxdtError("multi-node runs need --rdzv-endpoint HOST:PORT (the same on every node)")
        launch += ["--rdzv-backend", "c10d", "--rdzv-endpoint", args.rdzv_endpoint]
        launch += ["--rdzv-id", args.rdzv_id or "nxdt"]
        if args.node_rank is not None:
            launch += ["--node-rank", str(args.node_rank)]
    launch += ["-m", WORKER_MODULE, *worker_args]
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // max(1, nproc))))
    try:
        run(get_args_parser().parse_args(launch))
    except ChildFailedError as exc:
        failures = exc.failures
        first = failures[min(failures)] if failures else None
        code = first.exitcode if first else 1
        raise NxdtError(f"a worker failed (exit code {code}); its error is printed above") from None
    return 0


def print_dry_run(resolved, parallel, world_size: int, nproc: int, nnodes: str, as_json: bool) -> int:
    """Print the resolved run: config, world layout, accumulation and tokens per step."""
    cfg = resolved.config
    from nxdt.resolve import gradient_accumulation

    mbs, gbs = cfg.data.micro_batch_size, cfg.data.global_batch_size
    summary = {
        "target": resolved.source,
        "family": resolved.family,
        "recipe": resolved.recipe.name if resolved.recipe else None,
        "world": {"nnodes": nnodes, "nproc_per_node": nproc, "world_size": world_size},
        "layout": {"dp": parallel.dp, "tp": parallel.tp, "pp": parallel.pp, "ep": parallel.ep, "cp": parallel.cp,
                   "sequence_parallel": parallel.sequence_parallel},
        "micro_batch_size": mbs,
        "global_batch_size": gbs,
        "gradient_accumulation": gradient_accumulation(cfg, parallel.dp),
        "tokens_per_step": gbs * cfg.data.seq_length,
        "max_steps": cfg.trainer.max_steps,
        "unused_keys": cfg.unused_keys(backend="torch"),
    }
    if as_json:
        print(json.dumps({**summary, "config": cfg.to_dict()}, indent=2, default=str))
        return 0
    print(cfg.to_yaml(), end="")
    print("# --- run ---")
    for key, value in summary.items():
        print(f"# {key}: {value}")
    return 0
