"""Learning-rate schedules named as in NxDT configs (``model.optim.sched.name``)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from nxdt.errors import ConfigError


def lr_factor_fn(sched: Any, base_lr: float, max_steps: int) -> Callable[[int], float]:
    """A function step -> multiplier of ``base_lr`` for the configured schedule."""
    name = (sched.name if sched else None) or "constant"
    warmup = int(getattr(sched, "warmup_steps", 0) or 0)
    # The schedule's own length, else the run's (an epoch-based run's max_steps is -1 until the data is known).
    own = getattr(sched, "max_steps", None)
    total = int(own) if own is not None and own > 0 else max_steps
    min_lr = float(getattr(sched, "min_lr", 0.0) or 0.0)
    constant_steps = int(getattr(sched, "constant_steps", 0) or 0)
    min_factor = min_lr / base_lr if base_lr else 0.0

    def warm(step: int) -> float | None:
        # step counts from 0; the first optimizer step already gets a non-zero lr.
        return (step + 1) / warmup if warmup and step < warmup else None

    if name in ("constant", "Constant", "ConstantLR"):
        return lambda step: warm(step) or 1.0
    if name == "LinearAnnealingWithWarmUp":
        def linear(step: int) -> float:
            w = warm(step)
            if w is not None:
                return w
            span = max(1, total - warmup)
            return max(0.0, 1.0 - (step - warmup) / span)

        return linear
    if name == "CosineAnnealing":
        # NeMo semantics: warmup, cosine decay to min_lr, and the last `constant_steps` held at min_lr.
        decay_steps = max(1, total - warmup - constant_steps)

        def cosine(step: int) -> float:
            w = warm(step)
            if w is not None:
                return w
            progress = min(1.0, (step - warmup) / decay_steps)
            return min_factor + (1.0 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))

        return cosine
    raise ConfigError(
        f"model.optim.sched.name: unknown schedule {name!r}; one of LinearAnnealingWithWarmUp, CosineAnnealing, constant"
    )


def build_scheduler(optimizer: torch.optim.Optimizer, sched: Any, base_lr: float, max_steps: int):
    """A LambdaLR driving the configured schedule (its state is part of checkpoints)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor_fn(sched, base_lr, max_steps))
