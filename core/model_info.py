"""What a model is before any weight exists: exact parameter counts and FLOPs (memory per rank: ``nxdt.plan``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from nxdt.specs import ModelSpec


def build_on_meta(build: Any, config: Any) -> nn.Module:
    """Build a model on the meta device (no memory is allocated for weights)."""
    with torch.device("meta"):
        return build(config)


def count_parameters(model: nn.Module) -> int:
    """Exact number of parameters, shared (tied) tensors counted once."""
    return sum(p.numel() for p in model.parameters())  # parameters() already de-duplicates ties


def count_expert_parameters(model: nn.Module) -> int:
    """Parameters of mixture-of-experts weights (modules declaring ``nxdt_expert_params``), which EP splits."""
    return sum(getattr(m, name).numel() for m in model.modules() for name in getattr(m, "nxdt_expert_params", {}))


def describe(spec: ModelSpec, config: Any, seq_length: int, build: Any = None) -> dict[str, Any]:
    """Counts and FLOPs of ``config`` from a meta-device build (``build`` defaults to the family's builder)."""
    model = build_on_meta(build or spec.build_model, config)
    total = count_parameters(model)
    info: dict[str, Any] = {
        "parameters": total,
        "flops_per_token": float(spec.flops_per_token(config, seq_length)),
        "seq_length": seq_length,
    }
    if spec.is_moe and spec.active_parameters is not None:
        info["active_parameters"] = int(spec.active_parameters(config))
        info["expert_parameters"] = count_expert_parameters(model)
    return info


def architecture_dict(config: Any) -> dict[str, Any]:
    """The resolved architecture config as a plain dict."""
    import dataclasses

    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return dataclasses.asdict(config)
    if isinstance(config, Mapping):
        return dict(config)
    return dict(vars(config))


def format_count(n: int | None) -> str:
    """1234567890 -> '1.23B' for tables."""
    if n is None:
        return "-"
    for div, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.2f}{suffix}"
    return str(n)
