"""Refuses, before any weight is allocated, a run whose most loaded rank would not fit its device's memory.

The figure is the memory planner's (nxdt.plan): every phase of every pipeline rank, from the
build to the optimizer step, placed from the model already built on the meta device.
"""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from nxdt.errors import NxdtError

GIB = 1 << 30


def available_bytes(device: torch.device) -> int | None:
    """Free memory of ``device`` (GPU memory, or the machine's available RAM for CPU ranks)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 // _ranks_sharing_ram()
    except OSError:
        return None
    return None


def _ranks_sharing_ram() -> int:
    """CPU ranks on this node: they share its RAM."""
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))


def plan_for(ctx: Any, meta_model: nn.Module) -> Any:
    """The memory plan of ``ctx``'s run on its own device kind, placed from ``meta_model``."""
    from nxdt.plan import plan_memory, snapshot_of
    from nxdt.plan.devices import DEVICES
    from nxdt.plan.planner import layout_of

    cpu = ctx.world.device.type == "cpu"
    # Only the slack and runtime terms depend on the kind; the capacity checked is the free memory.
    target = DEVICES["cpu"] if cpu else replace(DEVICES["h100"], name=ctx.world.device.type)
    layout = layout_of(ctx.run, ctx.world.world_size)
    return plan_memory(ctx.run, layout=layout, target=target, snapshot=snapshot_of(ctx.run, ctx.host, meta_model),
                       host=ctx.host)


def check_model_fits(ctx: Any, meta_model: nn.Module) -> Any:
    """Raise a one-line error when the plan's most loaded rank exceeds this rank's free memory; returns the plan."""
    plan = plan_for(ctx, meta_model)
    free = available_bytes(ctx.world.device)
    if free is None or plan.peak_bytes <= free:
        return plan
    worst, lay = plan.worst, plan.layout
    phase = worst.peak_phase.replace("_", " ")
    raise NxdtError(
        f"the model will not fit: {plan.parameters:,} parameters need about {plan.peak_bytes / GIB:.1f} GiB on the most "
        f"loaded rank (pipeline rank {worst.pp_rank}, peak in {phase}: weights {worst.weights / GIB:.1f}, gradients "
        f"{worst.gradients / GIB:.1f}, optimizer state {(worst.optimizer_state + worst.master_weights) / GIB:.1f}, "
        f"activations {worst.activations / GIB:.1f} GiB; {lay.label}, precision={ctx.cfg.precision.type}), but "
        f"{_free_text(ctx.world.device, free)}; `nxdt plan {ctx.run.source} --search` lists layouts "
        "that fit (raise tensor/pipeline parallelism, enable zero1 or activation checkpointing, use a bf16 precision mode)"
    )


def _free_text(device: torch.device, free: int) -> str:
    """What ``free`` is: a GPU's free memory, or one CPU rank's share of the machine's available RAM."""
    ranks = _ranks_sharing_ram()
    if device.type != "cpu" or ranks == 1:
        return f"{device.type} has {free / GIB:.1f} GiB free"
    return (f"each of the {ranks} CPU ranks on this machine has {free / GIB:.1f} GiB "
            f"({free * ranks / GIB:.1f} GiB available, shared)")
