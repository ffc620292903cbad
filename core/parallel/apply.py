"""Applies a run's parallelism to a model built on the meta device, in a fixed order.

Order: materialize (init or HF weights, identical on every rank from the run seed) -> parameter
dtype -> pipeline split (each rank keeps its stages' blocks) -> KV-head replication ->
tensor/sequence parallel from the shard plan in force (a plugin's ``nxdt_shard_plan`` override
included) -> expert parallelism (modules styled ``expert``) -> activation checkpointing ->
``torch.compile`` per block (``model.fusions.torch_compile``) -> data parallel (DDP for plain DP;
explicit gradient sync for TP, EP and ZeRO-1 layouts, whose DTensor parameters or expert groups
DDP does not handle) -> the per-parameter record. Each step reads
plain data (the shard plan, the distributed_strategy, the resolved precision) from the
:class:`~nxdt.run_context.RunContext`; the model stays single-device code.
Every rank materializes the whole model before sharding: exact parity with one process, at the
cost of one full copy per rank while building (sharded initialisation is future work).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from nxdt.errors import ConfigError
from nxdt.parallel.model import ParallelModel
from nxdt.parallel.param_record import build_param_table
from nxdt.parallel.precision import torch_dtype

if TYPE_CHECKING:
    from nxdt.run_context import RunContext


def parallelize(model: nn.Module, ctx: RunContext, *, trainable: bool = True) -> ParallelModel:
    """Materialize, cast, split, shard, checkpoint-wrap and DP-wrap ``model`` for ``ctx``'s run.

    ``trainable=False`` builds a frozen copy (a DPO reference model): same layout, no gradients,
    no data-parallel wrapper and no optimizer.
    """
    run, parallel, world, mesh, cfg = ctx.run, ctx.parallel, ctx.world, ctx.mesh, ctx.cfg
    if parallel.cp > 1:
        raise ConfigError(
            f"distributed_strategy.context_parallel_size={parallel.cp}: context parallelism is not available yet; set it to 1"
        )
    precision = ctx.precision
    materialize(model, ctx)
    param_dtype = torch_dtype(precision.param_dtype)
    if param_dtype != torch.float32:
        # Parameters only: buffers such as RoPE tables keep their precision.
        for param in model.parameters():
            param.data = param.data.to(param_dtype)
    if not trainable:
        model.requires_grad_(False)
    pipeline = None
    if parallel.pp > 1:
        from nxdt.parallel.pipeline import plan_pipeline, prune_to_rank

        pipeline = plan_pipeline(model, ctx)
        prune_to_rank(model, pipeline)
    kv_names: list[str] = []
    kv_heads, kv_replicas = 0, 1
    if parallel.tp > 1:
        kv_names, kv_heads, kv_replicas = _shard(model, ctx, partial=pipeline is not None)
    sync = _split_experts(model, ctx, partial=pipeline is not None)
    from nxdt.parallel.activation_checkpoint import apply_activation_checkpointing

    if trainable:
        blocks = run.spec.pipeline_blocks(run.arch) if run.spec.pipeline_blocks else []
        apply_activation_checkpointing(
            model,
            cfg.model.activations_checkpoint_granularity,
            cfg.model.activations_checkpoint_recompute,
            run.spec.recompute_modules,
            blocks,
        )
    records = build_param_table(
        model,
        parallel.tp,
        kv_names=kv_names,
        kv_heads=kv_heads,
        kv_replicas=kv_replicas,
        aliases=pipeline.aliases if pipeline is not None else None,
        # both names of each tied pair: a stage holds one of them and finds its twin by the other
        tied=pipeline.tied if pipeline is not None else (),
        roles=dict.fromkeys(sync, "expert"),
        sync=sync,
    )
    zero1 = bool(cfg.distributed_strategy.zero1) and trainable
    flat_optimizer = trainable and (zero1 or precision.param_dtype != "fp32")
    ddp = None
    # Pipeline schedules run backward themselves, past DDP's hooks: their gradients sync explicitly,
    # as do expert-parallel experts, which sync over their own (edp) group.
    if trainable and parallel.dp > 1 and parallel.tp == 1 and not flat_optimizer and pipeline is None and parallel.ep == 1:
        from torch.nn.parallel import DistributedDataParallel

        ddp = DistributedDataParallel(
            model,
            device_ids=[world.device.index] if world.device.type == "cuda" else None,
            process_group=mesh["dp"].get_group(),
            # the loop never leaves parameters unused; finding them costs a graph walk per step
            find_unused_parameters=False,
        )
    common: dict[str, Any] = dict(
        mesh=mesh,
        parallel=parallel,
        precision=precision,
        zero1=zero1,
        flat_optimizer=flat_optimizer,
        records=records,
        inputs=run.spec.inputs,
        seed=cfg.seed,
    )
    if pipeline is not None:
        from nxdt.parallel.pipeline import PipelineModel

        return PipelineModel(
            model,
            pipeline,
            schedule=cfg.distributed_strategy.pipeline_schedule,
            n_microbatches=ctx.grad_accum,
            device=world.device,
            stage_inputs=run.spec.stage_inputs,
            **common,
        )
    return ParallelModel(model, ddp=ddp, **common)


def _split_experts(model: nn.Module, ctx: RunContext, partial: bool) -> dict[str, str]:
    """Split MoE experts over EP (and TP); returns each expert weight's sync dimension (``edp`` under EP)."""
    from nxdt.parallel.expert_parallel import apply_expert_parallel, expert_param_names

    names = expert_param_names(model)
    if ctx.parallel.tp > 1 or ctx.parallel.ep > 1:
        names = apply_expert_parallel(model, ctx, partial=partial)
    # Under EP an expert lives on its edp group only; else it is as replicated as any dense weight.
    return dict.fromkeys(names, "edp" if ctx.parallel.ep > 1 else "dp")


def _shard(model: nn.Module, ctx: RunContext, partial: bool = False) -> tuple[list[str], int, int]:
    """Replicate KV heads as needed, then apply the TP/SP plan; returns (KV param names, KV heads, replicas).

    ``partial``: ``model`` is one pipeline rank's part, so plan rules may match none of its modules.
    """
    from nxdt.parallel.kv_replication import kv_replication_factor, replicate_kv_
    from nxdt.parallel.tensor_parallel import apply_tensor_parallel

    run, parallel = ctx.run, ctx.parallel
    try:
        # The plan in force: a plugin's nxdt_shard_plan override, else the family's own.
        plan = ctx.host.shard_plan(run.spec, run.arch, parallel)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    names: list[str] = []
    kv_heads, replicas = 0, 1
    if plan.kv_projections:
        heads, kv = getattr(run.arch, "num_attention_heads", None), getattr(run.arch, "num_kv_heads", None)
        if heads is None or kv is None:
            raise ConfigError(
                f"{run.family}: the shard plan names KV projections but the architecture config has no "
                "num_attention_heads / num_kv_heads to size their replication"
            )
        kv_heads = int(kv)
        replicas = kv_replication_factor(kv_heads, heads, parallel.tp, parallel.kv_replicator)
        names = replicate_kv_(model, tuple(plan.kv_projections), kv_heads, replicas)
    apply_tensor_parallel(model, plan, ctx.mesh["tp"], parallel.sequence_parallel, partial=partial)
    return names, kv_heads or 0, replicas if names else 1


def materialize(model: nn.Module, ctx: RunContext) -> None:
    """Allocate real storage and fill it: HF weights when ``model.hf_checkpoint`` is set, else init.

    With ``model.use_cpu_initialization`` the weights are created and initialised on the CPU and
    then moved to the device (NxDT's option for devices whose RNG or memory should not be used).
    """
    device, run = ctx.world.device, ctx.run
    on_cpu = bool(ctx.cfg.model.use_cpu_initialization) and device.type != "cpu"
    init_device = torch.device("cpu") if on_cpu else device
    model.to_empty(device=init_device)
    with torch.random.fork_rng(devices=[init_device] if init_device.type == "cuda" else []):
        # Every rank initialises identically from the run seed, so replicas start equal.
        torch.manual_seed(ctx.cfg.seed)
        with torch.no_grad():
            run.spec.init_weights(model, run.arch)
    hf_dir = run.config.model.hf_checkpoint
    if hf_dir:
        from nxdt.pretrained import load_hf_weights

        load_hf_weights(model, run.spec, run.arch, hf_dir)
    if on_cpu:
        model.to(device)
