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
    # Sharded build: everything below runs on the meta device and each rank allocates only its own
    # shards at the end (nxdt.parallel.materialize); families without a per-parameter init rule are
    # materialized whole first.
    sharded_build = run.spec.init_parameter is not None and next(model.parameters()).is_meta
    if not sharded_build:
        materialize(model, ctx)
    param_dtype = torch_dtype(precision.param_dtype)
    if param_dtype != torch.float32:
        # Parameters only: buffers such as RoPE tables keep their precision.
        for param in model.parameters():
            param.data = param.data.to(param_dtype)
    roles: dict[str, str] = {}
    alignment = cfg.model_alignment_strategy
    if alignment is not None and alignment.peft is not None:
        roles = _add_lora(model, ctx)
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
    roles = {**roles, **dict.fromkeys(sync, "expert")}
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
        if cfg.model.fusions.torch_compile:
            from nxdt.parallel.compile import compile_blocks

            compile_blocks(model, blocks)
    if sharded_build:
        _allocate(model, world.device)
    records = build_param_table(
        model,
        parallel.tp,
        kv_names=kv_names,
        kv_heads=kv_heads,
        kv_replicas=kv_replicas,
        aliases=pipeline.aliases if pipeline is not None else None,
        # both names of each tied pair: a stage holds one of them and finds its twin by the other
        tied=pipeline.tied if pipeline is not None else (),
        roles=roles,
        sync=sync,
    )
    if sharded_build:
        _fill_sharded(model, records, kv_heads, kv_replicas, pipeline, ctx)
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


def _add_lora(model: nn.Module, ctx: RunContext) -> dict[str, str]:
    """Wrap the family's LoRA targets (before any split, identically on every rank); returns the adapter roles."""
    from nxdt.peft.lora import LoRASettings, adapter_roles, count_parameters, inject_lora, target_globs

    peft = ctx.cfg.model_alignment_strategy.peft  # type: ignore[union-attr]
    settings = LoRASettings.for_family(peft, ctx.spec)
    adapted = inject_lora(model, target_globs(ctx.spec, settings.targets), settings, ctx.cfg.seed)
    if peft.lora_verbose and ctx.world.is_main:
        trainable, total = count_parameters(model)
        print(f"nxdt: LoRA r={settings.rank} alpha={settings.alpha:g} on {len(adapted)} layers "
              f"({', '.join(settings.targets)}): {trainable:,} trainable of {total:,} parameters "
              f"({100 * trainable / total:.3f}%)", flush=True)
    return adapter_roles(model)


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
    plan = ctx.shard_plan()
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


def _allocate(model: nn.Module, device: torch.device) -> None:
    """``to_empty`` the sharded meta model on ``device``, keeping parameters that modules share tied."""
    shared: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        shared.setdefault(id(p), []).append(name)
    model.to_empty(device=device)
    for names in shared.values():
        first = model.get_parameter(names[0])
        for other in names[1:]:
            module_name, _, pname = other.rpartition(".")
            setattr(model.get_submodule(module_name) if module_name else model, pname, first)


def _fill_sharded(model: nn.Module, records: Any, kv_heads: int, kv_replicas: int, pipeline: Any, ctx: RunContext) -> None:
    """Initialise each rank's shards from per-parameter generators, then load HF weights layer by layer."""
    from types import SimpleNamespace

    from nxdt.parallel.materialize import init_sharded, load_hf_sharded

    kv = [r.param for r in records.kv_replicated()]
    # What nxdt.checkpoint.portable reads of a ParallelModel, before the ParallelModel exists.
    view = SimpleNamespace(trainable_module=model, records=records, kv_params=kv, kv_heads=kv_heads or 1,
                           kv_replicas=kv_replicas, checkpoint_aliases={r.local_name: r.name for r in records
                                                                         if r.name != r.local_name})
    run = ctx.run
    init_sharded(view, run.spec, run.arch, ctx.cfg.seed)
    if run.config.model.hf_checkpoint:
        load_hf_sharded(view, run.spec, run.arch, run.config.model.hf_checkpoint)


def single_device_state(run: Any) -> dict[str, torch.Tensor]:
    """The weights a run starts from, built in this process (what every layout's shards together hold)."""
    from types import SimpleNamespace

    from nxdt.parallel.param_record import build_param_table
    from nxdt.plugin_host import get_host

    with torch.device("meta"):
        model = get_host().build_model(run.spec, run.arch)
    if run.spec.init_parameter is None:
        model.to_empty(device="cpu")
        with torch.random.fork_rng():
            torch.manual_seed(run.config.seed)
            with torch.no_grad():
                run.spec.init_weights(model, run.arch)
        if run.config.model.hf_checkpoint:
            from nxdt.pretrained import load_hf_weights

            load_hf_weights(model, run.spec, run.arch, run.config.model.hf_checkpoint)
    else:
        _allocate(model, torch.device("cpu"))
        records = build_param_table(model, 1)
        view = SimpleNamespace(trainable_module=model, records=records, kv_params=[], kv_heads=1, kv_replicas=1,
                               checkpoint_aliases={})
        from nxdt.parallel.materialize import init_sharded, load_hf_sharded

        init_sharded(view, run.spec, run.arch, run.config.seed)
        if run.config.model.hf_checkpoint:
            load_hf_sharded(view, run.spec, run.arch, run.config.model.hf_checkpoint)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


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
