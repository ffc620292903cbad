"""AdamW from NxDT's ``model.optim`` keys, with weight-decay exclusion for norms and biases."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from nxdt.errors import ConfigError

# NxDT optimizer names; the fp32OptState variant keeps optimizer state in fp32, which nxdt does
# whenever master weights are kept (see nxdt.parallel.precision), so both map to AdamW here.
ADAMW_NAMES = ("adamw", "adamw_fp32OptState", "adam")


def param_groups(model: nn.Module, weight_decay: float, decay_norms_and_biases: bool) -> list[dict[str, Any]]:
    """Split trainable parameters into decayed and non-decayed groups (1-D tensors are norms/biases)."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for _, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (decay if decay_norms_and_biases or param.ndim >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


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
    if on_cuda and not is_dtensor:
        kwargs["fused"] = True
    else:
        # foreach kernels do not take lists mixing DTensor (TP-sharded) and plain (replicated) parameters.
        kwargs["foreach"] = not is_dtensor
    return torch.optim.AdamW(groups, **kwargs)
