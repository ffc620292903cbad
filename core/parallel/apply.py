"""Applies a run's parallelism to a model built on the meta device, in a fixed order.

Order (as torchtitan and NxD do it): tensor/sequence parallel from the family's shard plan ->
activation checkpointing -> materialize (init or load weights) -> data parallel. Each step
reads plain data (the shard plan, the distributed_strategy) and the model stays single-device code.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from nxdt.parallel.model import ParallelModel


def parallelize(model: nn.Module, trainer: Any) -> ParallelModel:
    """Shard, checkpoint-wrap, materialize and DP-wrap ``model`` for ``trainer``'s run."""
    run, parallel, world = trainer.run, trainer.parallel, trainer.world
    if parallel.tp > 1 or parallel.pp > 1 or parallel.cp > 1:
        raise NotImplementedError(
            "tensor, pipeline and context parallelism are not available in this build; "
            "set distributed_strategy sizes to 1"
        )
    materialize(model, run, world.device, trainer.cfg.seed)
    ddp = None
    if parallel.dp > 1:
        from torch.nn.parallel import DistributedDataParallel

        ddp = DistributedDataParallel(
            model,
            device_ids=[world.device.index] if world.device.type == "cuda" else None,
            process_group=trainer.mesh["dp"].get_group(),
            # the loop never leaves parameters unused; finding them costs a graph walk per step
            find_unused_parameters=False,
        )
    return ParallelModel(model, ddp, dp_group=trainer.mesh["dp"].get_group() if ddp else None)


def materialize(model: nn.Module, run: Any, device: torch.device, seed: int) -> None:
    """Allocate real storage and fill it: HF weights when ``model.hf_checkpoint`` is set, else init."""
    model.to_empty(device=device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        # Every rank initialises identically from the run seed, so replicas start equal.
        torch.manual_seed(seed)
        with torch.no_grad():
            run.spec.init_weights(model, run.arch)
    hf_dir = run.config.model.hf_checkpoint
    if hf_dir:
        from nxdt.pretrained import load_hf_weights

        load_hf_weights(model, run.spec, run.arch, hf_dir)

