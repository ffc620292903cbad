"""Applies a run's parallelism to a model built on the meta device, in a fixed order.

Order: materialize (init or HF weights, identical on every rank from the run seed) -> parameter
dtype -> pipeline split (each rank keeps its stages' blocks) -> KV-head replication -> tensor/sequence parallel from the family's shard plan ->
activation checkpointing -> data parallel (DDP for plain DP; explicit gradient sync for TP and
ZeRO-1 layouts, whose DTensor parameters DDP does not accept). Each step reads plain data (the
shard plan, the distributed_strategy, the resolved precision); the model stays single-device code.
Every rank materializes the whole model before sharding: exact parity with one process, at the
cost of one full copy per rank while building (sharded initialisation is future work).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from nxdt.errors import ConfigError
from nxdt.parallel.model import ParallelModel
from nxdt.parallel.precision import torch_dtype


def parallelize(model: nn.Module, trainer: Any) -> ParallelModel:
    """Materialize, cast, replicate KV heads, shard, checkpoint-wrap and DP-wrap ``model`` for ``trainer``'s run."""
    run, parallel, world, mesh = trainer.run, trainer.parallel, trainer.world, trainer.mesh
    cfg = trainer.cfg
    if parallel.cp > 1:
        raise ConfigError(
            f"distributed_strategy.context_parallel_size={parallel.cp}: context parallelism is not available yet; set it to 1"
        )
    precision = cfg.precision.resolved(cfg.model.optim.name)
    materialize(model, run, world.device, cfg.seed)
    param_dtype = torch_dtype(precision.param_dtype)
    if param_dtype != torch.float32:
        # Parameters only: buffers such as RoPE tables keep their precision.
        for param in model.parameters():
            param.data = param.data.to(param_dtype)
    pipeline = None
    if parallel.pp > 1:
        from nxdt.parallel.pipeline import plan_pipeline, prune_to_rank

        pipeline = plan_pipeline(model, run, parallel, mesh, cfg)
        prune_to_rank(model, pipeline)
    kv = None
    if parallel.tp > 1:
        kv = _shard(model, run, parallel, mesh["tp"], partial=pipeline is not None)
    from nxdt.parallel.activation_checkpoint import apply_activation_checkpointing

    blocks = run.spec.pipeline_blocks(run.arch) if run.spec.pipeline_blocks else []
    apply_activation_checkpointing(
        model,
        cfg.model.activations_checkpoint_granularity,
        cfg.model.activations_checkpoint_recompute,
        run.spec.recompute_modules,
        blocks,
    )
    zero1 = bool(cfg.distributed_strategy.zero1)
    flat_optimizer = zero1 or precision.param_dtype != "fp32"
    ddp = None
    # Pipeline schedules run backward themselves, past DDP's hooks: their gradients sync explicitly.
    if parallel.dp > 1 and parallel.tp == 1 and not flat_optimizer and pipeline is None:
        from torch.nn.parallel import DistributedDataParallel

        ddp = DistributedDataParallel(
            model,
            device_ids=[world.device.index] if world.device.type == "cuda" else None,
            process_group=mesh["dp"].get_group(),
            # the loop never leaves parameters unused; finding them costs a graph walk per step
            find_unused_parameters=False,
        )
    common = dict(
        mesh=mesh, parallel=parallel, precision=precision, zero1=zero1, flat_optimizer=flat_optimizer, kv=kv, seed=cfg.seed
    )
    if pipeline is not None:
        from nxdt.parallel.pipeline import PipelineModel

        return PipelineModel(
            model,
            pipeline,
            schedule=cfg.distributed_strategy.pipeline_schedule,
            n_microbatches=trainer.grad_accum,
            device=world.device,
            **common,
        )
    return ParallelModel(model, ddp=ddp, **common)


def _shard(
    model: nn.Module, run: Any, parallel: Any, tp_mesh: Any, partial: bool = False
) -> tuple[list[str], int, int] | None:
    """Replicate KV heads as needed, then apply the TP/SP plan; returns (KV param names, heads, replicas).

    ``partial``: ``model`` is one pipeline rank's part, so plan rules may match none of its modules.
    """
    from nxdt.parallel.kv_replication import kv_replication_factor, replicate_kv_
    from nxdt.parallel.tensor_parallel import apply_tensor_parallel

    try:
        plan = run.spec.shard_plan(run.arch, parallel)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    kv = None
    if plan.kv_projections:
        heads, kv_heads = getattr(run.arch, "num_attention_heads", None), getattr(run.arch, "num_kv_heads", None)
        if heads is None or kv_heads is None:
            raise ConfigError(
                f"{run.family}: the shard plan names KV projections but the architecture config has no "
                "num_attention_heads / num_kv_heads to size their replication"
            )
        replicas = kv_replication_factor(kv_heads, heads, parallel.tp, parallel.kv_replicator)
        names = replicate_kv_(model, tuple(plan.kv_projections), kv_heads, replicas)
        kv = (names, kv_heads, replicas) if names else None
    apply_tensor_parallel(model, plan, tp_mesh, parallel.sequence_parallel, partial=partial)
    return kv


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
