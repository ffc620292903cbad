"""AdamW from NxDT's ``model.optim`` keys, with weight-decay exclusion for norms and biases."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from nxdt.errors import ConfigError
from nxdt.weight_decay import ADAMW_NAMES, named_decay_groups


def param_groups(model: nn.Module, weight_decay: float, decay_norms_and_biases: bool) -> list[dict[str, Any]]:
    """Split trainable parameters into decayed and non-decayed groups (1-D tensors are norms/biases)."""
    groups = named_decay_groups(model.named_parameters(), weight_decay, decay_norms_and_biases)
    return [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in groups]


def build_optimizer(model: nn.Module, optim_cfg: Any, do_layer_norm_weight_decay: bool) -> torch.optim.Optimizer:
    """AdamW, fused where the device supports it, else foreach."""
    name = optim_cfg.name or "adamw"
    if name not in ADAMW_NAMES:
        raise ConfigError(f"model.optim.name: unsupported optimizer {name!r}; supported: {', '.join(ADAMW_NAMES)}")
    groups = param_groups(model, optim_cfg.weight_decay or 0.0, bool(do_layer_norm_weight_decay))
    params = [p for g in groups for p in g["params"]]
    # Fused AdamW needs floating-point parameters on CUDA (or CPU in recent torch) of one device
    # type and no DTensor mix; fall back to foreach otherwise.
    on_cuda = bool(params) and all(p.is_cuda for p in params)
    is_dtensor = any(type(p).__name__ == "DTensor" or type(getattr(p, "data", None)).__name__ == "DTensor" for p in params)
    kwargs: dict[str, Any] = {
        "lr": optim_cfg.lr,
        "betas": tuple(optim_cfg.betas or (0.9, 0.95)),
        "eps": getattr(optim_cfg, "eps", None) or 1e-8,
    }
    if on_cuda and getattr(optim_cfg, "capturable", False):
        kwargs["capturable"] = True  # step counters stay on the device (CUDA-graph capture); CPU has no such mode
    if on_cuda and not is_dtensor:
        kwargs["fused"] = True
    else:
        # foreach kernels do not take lists mixing DTensor (TP-sharded) and plain (replicated) parameters.
        kwargs["foreach"] = not is_dtensor
    return torch.optim.AdamW(groups, **kwargs)
