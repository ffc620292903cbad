"""What a model is before any weight exists: exact parameter counts, FLOPs and memory per rank."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from nxdt.specs import ModelSpec, ParallelDims

_BYTES = {"fp32": 4, "bf16": 2}


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


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per rank of the model state during training (activations excluded)."""

    weights: int
    gradients: int
    master_weights: int
    optimizer_state: int

    @property
    def total(self) -> int:
        """All model-state bytes held by one rank."""
        return self.weights + self.gradients + self.master_weights + self.optimizer_state

    def as_dict(self) -> dict[str, float]:
        """The estimate in GiB, rounded for display."""
        gib = 1 << 30
        return {k: round(v / gib, 2) for k, v in vars(self).items()} | {"total": round(self.total / gib, 2)}


def estimate_memory(
    parameters: int,
    parallel: ParallelDims,
    param_dtype: str = "bf16",
    master_weights: bool = True,
    optimizer_state_dtype: str = "fp32",
    zero1: bool = True,
    expert_parameters: int = 0,
) -> MemoryEstimate:
    """Model-state memory per rank: weights and grads split by TP x PP, optimizer state also by DP with ZeRO-1.

    ``expert_parameters`` (of ``parameters``) are also split over EP, and ZeRO-1 shards them over
    the ``dp / ep`` ranks that hold the same experts.
    """
    model_parallel = parallel.tp * parallel.pp
    dense = (parameters - expert_parameters) / model_parallel
    experts = expert_parameters / (model_parallel * parallel.ep)
    local = dense + experts
    sharded = dense / parallel.dp + experts / (parallel.dp // parallel.ep) if zero1 else local
    weight_bytes = _BYTES[param_dtype]
    master = sharded * 4 if master_weights and param_dtype != "fp32" else 0
    # AdamW keeps two moments per parameter.
    optim = sharded * 2 * _BYTES[optimizer_state_dtype]
    return MemoryEstimate(
        weights=int(local * weight_bytes),
        gradients=int(local * (4 if master_weights else weight_bytes)),
        master_weights=int(master),
        optimizer_state=int(optim),
    )


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
