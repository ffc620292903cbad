"""`nxdt plan`: each rank's memory for a layout on a device, the verdict, and with --search the layouts that fit."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from nxdt.errors import ConfigError


def add_parser(sub: argparse._SubParsersAction, add_common: Callable[[argparse.ArgumentParser], None]) -> None:
    """Register `nxdt plan`."""
    from nxdt.plan.devices import DEVICES

    p = sub.add_parser("plan", help="memory per rank of a layout on a device, whether it fits, and (--search) layouts that do")
    p.add_argument("target", help="a preset name or a YAML config file")
    p.add_argument("overrides", nargs="*", help="key.path=value overrides (distributed_strategy.*, data.*, precision.*, ...)")
    p.add_argument("--recipe", help="the recipe whose data and objective to plan for (default: as `nxdt run`)")
    p.add_argument("--device", default="h100", choices=sorted(DEVICES), help="the accelerator (default h100)")
    p.add_argument("--nodes", type=int, default=None, help="nodes (default: trainer.num_nodes)")
    p.add_argument("--devices-per-node", type=int, default=None,
                   help="ranks per node (default: the device's: 8 GPUs, 32 trn1 / 64 trn2 NeuronCores, trainer.devices on cpu)")
    p.add_argument("--device-memory", type=float, default=None, metavar="GIB", help="memory per rank in GiB (overrides the device's)")
    p.add_argument("--search", action="store_true", help="rank every (TP, PP, VPP, DP, EP, ZeRO-1, AC) layout of the world")
    p.add_argument("--top", type=int, default=10, help="layouts to show with --search (default 10)")
    p.add_argument("--sharded-build", action="store_true",
                   help="plan the build and HF load as sharded even for a family without a per-parameter init rule "
                        "(kit families always build sharded; other families materialise the whole model on every rank)")
    add_common(p)


def cmd_plan(args: argparse.Namespace) -> int:
    """Print the plan (or the search) for the target on the device."""
    from nxdt.cli.main import print_json
    from nxdt.plan import device, lines, plan_memory, snapshot_of
    from nxdt.plan.estimate import Layout
    from nxdt.plan.planner import layout_of
    from nxdt.resolve import default_recipe, resolve

    for flag, value in (("--nodes", args.nodes), ("--devices-per-node", args.devices_per_node), ("--top", args.top)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag} must be a positive number, got {value}")
    if args.device_memory is not None and args.device_memory <= 0:
        raise ConfigError(f"--device-memory must be a positive number of GiB, got {args.device_memory:g}")
    base = resolve(args.target, args.recipe or default_recipe(args.target), args.overrides)
    cfg = base.config
    nodes = args.nodes or cfg.trainer.num_nodes or 1
    per_node = args.devices_per_node or (cfg.trainer.devices or 1 if args.device == "cpu" else None)
    dev = device(args.device, args.device_memory, per_node)
    world = nodes * dev.ranks_per_node
    overrides = [*args.overrides, f"trainer.devices={dev.ranks_per_node}", f"trainer.num_nodes={nodes}"]
    run = resolve(args.target, args.recipe or default_recipe(args.target), overrides)
    snapshot = snapshot_of(run)
    sharded = True if args.sharded_build else None
    if not args.search:
        plan = plan_memory(run, world_size=world, target=dev, snapshot=snapshot, sharded_build=sharded)
        if args.json:
            print_json(plan.as_dict())
        else:
            print("\n".join(lines(plan)))
        return 0
    from nxdt.plan.search import MFU, search

    try:
        base_layout = layout_of(run, world)
    except ConfigError:  # the config's own TP x PP need not divide this world: the search sets them anyway
        ds = run.config.distributed_strategy
        base_layout = Layout(micro_batch_size=run.config.data.micro_batch_size, kv_replicator=ds.kv_replicator or 1,
                             schedule=ds.pipeline_schedule)
    found = search(run, world, dev, snapshot=snapshot, base=base_layout, sharded_build=sharded)
    if not found:
        raise ConfigError(f"no layout of {world} ranks splits {run.source}: check data.global_batch_size "
                          f"({cfg.data.global_batch_size}) against micro_batch_size x DP and the head counts against TP")
    fitting = [c for c in found if c.plan.fits]
    shown = (fitting or found)[: args.top]
    if args.json:
        print_json({"world_size": world, "device": dev.name, "mfu_assumed": MFU, "fitting": len(fitting),
                    "searched": len(found), "layouts": [c.as_dict() for c in shown],
                    "best": shown[0].plan.as_dict()})
        return 0
    print(f"searched {len(found)} layouts of {world} ranks ({nodes} x {dev.ranks_per_node} {dev.name}); "
          f"{len(fitting)} fit. Step time: FLOPs at {MFU:.0%} of {dev.peak_tflops:g} TFLOPS per rank, pipeline bubble, "
          "communication volume over link bandwidth, no overlap (docs/memory.md)")
    if not fitting:
        blocked = sum(c.plan.training_peak_bytes <= c.plan.capacity_bytes for c in found)
        print("no layout fits; the smallest peaks:" if not blocked else
              f"no layout fits; {blocked} would in training: this family's whole-model build is what does not "
              "(--sharded-build plans a sharded one). The smallest peaks:")
    print(f"{'#':>3} {'layout':<44} {'peak GiB':>9} {'step s':>9} {'comm s':>8} {'bubble':>7}")
    for i, c in enumerate(shown, 1):
        print(f"{i:>3} {c.plan.layout.label:<44} {c.plan.peak_bytes / 2**30:>9.2f} {c.step_s:>9.2f} {c.comm_s:>8.2f} "
              f"{c.bubble:>7.1%}")
    print()
    print("\n".join(lines(shown[0].plan)))
    return 0
