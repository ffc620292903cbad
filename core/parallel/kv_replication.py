"""GQA KV-head replication for tensor parallelism (NxD's ``kv_size_multiplier``).

When TP is larger than the number of KV heads, a column split would cut a KV head in two. Each KV
head's rows in the K and V projections are therefore repeated ``r`` times (``repeat_interleave``,
so copies of one head are adjacent) before sharding, until ``kv_heads * r`` divides evenly over TP.
Query head ``i`` still meets a copy of its original KV head ``i // (heads / kv_heads)``. The copies
must stay identical: their gradients are summed and every copy receives the sum, which is exactly
the gradient of the single shared head. Checkpoints and HF exports hold each KV head once
(:func:`unreplicate_kv`); loading under another TP size repeats them again (:func:`replicate_kv`).
"""

from __future__ import annotations

import fnmatch
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from nxdt.errors import ConfigError


def kv_replication_factor(num_kv_heads: int, num_heads: int, tp: int, requested: int = 1) -> int:
    """The replication factor for ``tp``: ``requested`` (kv_replicator) or the smallest that fits."""
    r = requested if requested > 1 else (tp // num_kv_heads if tp > num_kv_heads else 1)
    kv = num_kv_heads * r
    if kv % tp or num_heads % kv:
        raise ConfigError(
            f"KV replication: num_kv_heads ({num_kv_heads}) x kv_replicator ({r}) = {kv} KV heads must be a multiple "
            f"of tensor_model_parallel_size ({tp}) and divide num_attention_heads ({num_heads}); "
            f"set distributed_strategy.kv_replicator so that num_kv_heads x kv_replicator is a multiple of {tp}"
        )
    return r


def replicate_kv_(model: nn.Module, globs: tuple[str, ...] | list[str], num_kv_heads: int, replicas: int) -> list[str]:
    """Repeat every KV head ``replicas`` times in the materialized projections matching ``globs``.

    Returns the names of the replaced parameters (their rows are heads x copies x head_dim).
    """
    if replicas == 1:
        return []
    names = []
    for name, module in model.named_modules():
        if not any(fnmatch.fnmatchcase(name, g) for g in globs):
            continue
        if not isinstance(module, nn.Linear):
            raise ConfigError(f"KV replication: {name} is a {type(module).__name__}, not a Linear")
        for pname, param in list(module.named_parameters(recurse=False)):
            if pname == "lora_A":
                continue  # an adapter's input side: its rows are the rank, not heads
            rows = param.detach().unflatten(0, (num_kv_heads, -1)).repeat_interleave(replicas, dim=0).flatten(0, 1)
            setattr(module, pname, nn.Parameter(rows.clone(), requires_grad=param.requires_grad))
            names.append(f"{name}.{pname}")
        module.out_features *= replicas
    return names


def unreplicate_kv(full: torch.Tensor, num_kv_heads: int, replicas: int) -> torch.Tensor:
    """The original (unreplicated) weight or bias from a full replicated one (copy 0 of each head)."""
    if replicas == 1:
        return full
    return full.unflatten(0, (num_kv_heads, replicas, -1))[:, 0].flatten(0, 1)


def replicate_kv(full: torch.Tensor, num_kv_heads: int, replicas: int) -> torch.Tensor:
    """The replicated weight or bias from an unreplicated one (the inverse of :func:`unreplicate_kv`)."""
    if replicas == 1:
        return full
    return full.unflatten(0, (num_kv_heads, -1)).repeat_interleave(replicas, dim=0).flatten(0, 1)


@torch.no_grad()
def sum_replica_grads_(local_grads: list[torch.Tensor], num_kv_heads: int, replicas: int, tp_mesh: Any) -> None:
    """Give every copy of a replicated KV head the sum of the gradients of all its copies.

    ``local_grads`` are this rank's rows of each replicated projection's gradient (modified in
    place). Copies may sit on different TP ranks or on the same one, so each rank places its rows
    in a full-size buffer, the TP group sums the buffers, and the copies are then summed per head.
    """
    tp = tp_mesh.size() if tp_mesh is not None else 1
    rank = tp_mesh.get_local_rank() if tp_mesh is not None else 0
    for local in local_grads:
        rows = local.shape[0]
        full = local.new_zeros((rows * tp, *local.shape[1:]))
        full[rank * rows : (rank + 1) * rows] = local
        if tp > 1:
            dist.all_reduce(full, group=tp_mesh.get_group())
        per_head = full.unflatten(0, (num_kv_heads, replicas, -1)).sum(dim=1, keepdim=True)
        summed = per_head.expand(-1, replicas, *per_head.shape[2:]).flatten(0, 2)
        local.copy_(summed[rank * rows : (rank + 1) * rows])
