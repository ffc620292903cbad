"""Global gradient norms over TP and DP layouts, each replicated value counted once.

Every local gradient element carries a replica count: how many TP ranks hold an identical copy
(TP-sharded weights 1, parameters replicated over TP ``tp``, replicated KV heads ``r``). Weighting
squares by ``1 / count`` and summing over the TP group counts each distinct value exactly once.
Gradients are identical across DP ranks after synchronisation, so DP adds nothing unless the
gradients themselves are sharded over DP (ZeRO-1), when the shards' sums are added over DP too.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Shard


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The rank-local part of a DTensor (aliasing its storage), or ``t`` itself."""
    return t.to_local() if isinstance(t, DTensor) else t


def align_grad_(param: torch.Tensor) -> torch.Tensor | None:
    """Give ``param.grad`` the parameter's placements and return it.

    Autograd may leave a DTensor gradient in another layout than its parameter (the
    vocabulary-parallel embedding's gradient arrives Replicate for a Shard(0) weight); local
    shards of gradient and parameter must line up for sync, norms and the optimizer.
    """
    grad = param.grad
    if isinstance(grad, DTensor) and isinstance(param, DTensor) and grad.placements != param.placements:
        param.grad = grad = grad.redistribute(param.device_mesh, param.placements)
    return grad


def tp_replica_count(param: torch.Tensor, tp: int, kv_replicas: int = 1, is_kv: bool = False) -> int:
    """How many TP ranks hold an identical copy of each element of ``param``'s local tensor."""
    if isinstance(param, DTensor) and any(isinstance(p, Shard) for p in param.placements):
        return kv_replicas if is_kv else 1
    return tp


def weighted_sq_sum(tensors: list[torch.Tensor], weights: list[float | torch.Tensor]) -> torch.Tensor:
    """Sum of ``weight * |t|^2`` in fp32 (weights are scalars or per-element tensors)."""
    total = torch.zeros((), dtype=torch.float32, device=tensors[0].device if tensors else "cpu")
    by_weight: dict[float, list[torch.Tensor]] = {}
    for t, w in zip(tensors, weights):
        if isinstance(w, torch.Tensor):
            total += (t.float().pow(2) * w).sum()
        else:
            by_weight.setdefault(float(w), []).append(t)
    # One batched norm kernel per distinct scalar weight instead of a few kernels per tensor.
    for w, group in by_weight.items():
        norms = torch._foreach_norm(group, 2.0, dtype=torch.float32)
        total += w * torch.stack(norms).pow(2).sum()
    return total


def reduce_norm(sq_sum: torch.Tensor, groups: list[Any]) -> float:
    """sqrt of ``sq_sum`` summed over each process group in ``groups`` (None entries skipped)."""
    for group in groups:
        if group is not None:
            dist.all_reduce(sq_sum, group=group)
    return float(sq_sum.sqrt())


@torch.no_grad()
def clip_(tensors: list[torch.Tensor], total_norm: float, max_norm: float | None) -> None:
    """Scale ``tensors`` in place so their global norm is at most ``max_norm`` (torch's coefficient)."""
    if max_norm is None or not tensors:
        return
    coef = max_norm / (total_norm + 1e-6)
    if coef < 1.0:
        torch._foreach_mul_(tensors, coef)
