"""Which parameters AdamW decays, and the optimizer names nxdt accepts (shared by both AdamW paths)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn

# NxDT optimizer names; the fp32OptState variant keeps optimizer state in fp32, which nxdt does
# whenever master weights are kept (see nxdt.parallel.precision), so both map to AdamW here.
ADAMW_NAMES = ("adamw", "adamw_fp32OptState", "adam")


def decays(param: nn.Parameter, decay_norms_and_biases: bool) -> bool:
    """Whether ``param`` takes weight decay: matrices always, 1-D norms and biases only when asked."""
    return decay_norms_and_biases or param.ndim >= 2


def named_decay_groups(
    named: Iterable[tuple[str, nn.Parameter]], weight_decay: float, decay_norms_and_biases: bool
) -> list[dict[str, Any]]:
    """Trainable parameters split into a decayed and a non-decayed group, each with ``names`` and ``params``."""
    decay: dict[str, Any] = {"names": [], "params": [], "weight_decay": weight_decay}
    no_decay: dict[str, Any] = {"names": [], "params": [], "weight_decay": 0.0}
    for name, param in named:
        if not param.requires_grad:
            continue
        group = decay if decays(param, decay_norms_and_biases) else no_decay
        group["names"].append(name)
        group["params"].append(param)
    return [decay] + ([no_decay] if no_decay["params"] else [])
