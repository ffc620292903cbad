"""Refuses, before any weight is allocated, a run whose model state cannot fit on one rank."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from nxdt.errors import NxdtError
from nxdt.model_info import count_parameters, estimate_memory

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
                    available = int(line.split()[1]) * 1024
                    # CPU ranks of one node share its RAM.
                    return available // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    except OSError:
        return None
    return None


def check_model_fits(trainer: Any, meta_model: nn.Module) -> None:
    """Raise a one-line error when ``meta_model``'s weights + gradients + optimizer state exceed the rank's memory."""
    parallel = trainer.parallel
    parameters = count_parameters(meta_model)
    precision = trainer.precision
    estimate = estimate_memory(
        parameters,
        parallel,
        param_dtype=precision.param_dtype,
        master_weights=precision.master_weights,
        optimizer_state_dtype=precision.optimizer_state_dtype,
        zero1=bool(trainer.cfg.distributed_strategy.zero1),
    )
    free = available_bytes(trainer.world.device)
    if free is not None and estimate.total > free:
        raise NxdtError(
            f"the model will not fit: {parameters:,} parameters need about {estimate.total / GIB:.1f} GiB per rank "
            f"for weights, gradients and optimizer state (TP={parallel.tp} PP={parallel.pp} DP={parallel.dp}, "
            f"zero1={bool(trainer.cfg.distributed_strategy.zero1)}, precision={trainer.cfg.precision.type}), "
            f"but {trainer.world.device.type} has {free / GIB:.1f} GiB free; raise tensor/pipeline parallelism, "
            f"enable zero1, or use a bf16 precision mode"
        )
