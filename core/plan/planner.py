"""The memory plan of a run: every pipeline rank's bytes by kind and phase, and the verdict against a device.

``plan_memory(run, ...)`` needs no trainer and no process group: the layout comes from the run's
``distributed_strategy`` and batch keys (or is given), parameter placement from one meta-device
build (or the one the caller already has), activations from :mod:`nxdt.plan.activations`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from nxdt.errors import ConfigError
from nxdt.plan.activations import activation_model
from nxdt.plan.devices import GIB, Device, device
from nxdt.plan.estimate import Facts, Layout, RankMemory, rank_memory
from nxdt.plan.placement import ModelSnapshot, place

#: CPU ranks: resident memory a training process adds beyond its tensors' bytes (thread pools and
#: their malloc arenas, the autograd engine, data and tokenizer, gloo buffers), measured on
#: llama3-tiny runs (bench/memory_planner.py, docs/memory.md)
CPU_RUNTIME_BYTES = 160 << 20
#: CPU ranks: resident pages malloc keeps for freed tensors, as a share of the modelled peak
CPU_ALLOCATOR_SLACK = 0.15
#: CUDA ranks: the caching allocator's reserved-over-allocated margin (fragmentation)
CUDA_ALLOCATOR_SLACK = 0.05
#: the phases that only happen once, before training (what a sharded build and load change)
BUILD_PHASES = ("build", "hf_load")


@dataclass
class MemoryPlan:
    """A run's memory per pipeline rank on a device, and whether it fits."""

    source: str
    layout: Layout
    device: Device
    facts: Facts
    ranks: list[RankMemory]
    parameters: int
    runtime_bytes: int
    slack: float
    notes: list[str] = field(default_factory=list)
    sharded_build: bool | None = None  # as planned (None: as the engine builds today)

    def predicted(self, rank: RankMemory) -> int:
        """The peak a rank should see: its largest phase, allocator slack and the runtime on top."""
        return int(rank.peak * (1 + self.slack)) + self.runtime_bytes

    @property
    def peak_bytes(self) -> int:
        """The most loaded rank's predicted peak."""
        return max(self.predicted(r) for r in self.ranks)

    @property
    def worst(self) -> RankMemory:
        """The most loaded pipeline rank."""
        return max(self.ranks, key=self.predicted)

    @property
    def capacity_bytes(self) -> int:
        """Memory one rank may use on the device (reported memory minus the runtime's reserve)."""
        return self.device.usable_bytes

    @property
    def fits(self) -> bool:
        """Whether the most loaded rank fits the device in every phase."""
        return self.peak_bytes <= self.capacity_bytes

    @property
    def training_peak_bytes(self) -> int:
        """The most loaded rank's predicted peak leaving out the build and HF load transients."""
        return max(int(max(v for k, v in r.phases.items() if k not in BUILD_PHASES) * (1 + self.slack)) + self.runtime_bytes
                   for r in self.ranks)

    def as_dict(self) -> dict[str, Any]:
        """Machine-readable plan (``--json``)."""
        from nxdt.plan.report import assumptions

        return {
            "source": self.source,
            "layout": {**vars(self.layout), "label": self.layout.label, "world_size": self.layout.world_size},
            "device": {"name": self.device.name, "memory_gib": self.device.memory_gib,
                       "reserve_gib": self.device.reserve_gib, "source": self.device.source},
            "parameters": self.parameters,
            "ranks": [{**r.as_dict(), "predicted_peak_gib": round(self.predicted(r) / GIB, 3)} for r in self.ranks],
            "peak_gib": round(self.peak_bytes / GIB, 3),
            "capacity_gib": round(self.capacity_bytes / GIB, 3),
            "fits": self.fits,
            "training_peak_gib": round(self.training_peak_bytes / GIB, 3),
            "assumptions": assumptions(self),
            "notes": self.notes,
        }


def snapshot_of(run: Any, host: Any = None, model: Any = None) -> ModelSnapshot:
    """The placement snapshot of ``run``'s model: ``model`` (a meta build) or a fresh meta build, LoRA included."""
    from nxdt.plugin_host import get_host

    host = host or get_host()
    if model is None:
        with _no_init(), torch.device("meta"):
            model = host.build_model(run.spec, run.arch)
    peft = getattr(run.config.model_alignment_strategy, "peft", None) if run.config.model_alignment_strategy else None
    if peft is not None:
        import copy

        from nxdt.peft.lora import LoRASettings, inject_lora, target_globs

        model = copy.deepcopy(model)  # the caller's meta model is parallelized later, LoRA added there

        spec = run.spec
        settings = LoRASettings.for_family(peft, spec)
        with torch.device("meta"):
            inject_lora(model, target_globs(spec, settings.targets), settings, run.config.seed)
    blocks = run.spec.pipeline_blocks(run.arch) if run.spec.pipeline_blocks else []
    return ModelSnapshot.of(model, blocks)


@contextlib.contextmanager
def _no_init() -> Iterator[None]:
    """``torch.nn.init``'s in-place initialisers as no-ops: on meta tensors they only cost time (most of a 405B build)."""
    from torch.nn import init

    names = [n for n in vars(init) if n.endswith("_") and not n.startswith("_") and callable(getattr(init, n))]
    saved = {n: getattr(init, n) for n in names}
    try:
        for n in names:
            setattr(init, n, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for n, f in saved.items():
            setattr(init, n, f)


def layout_of(run: Any, world_size: int | None = None) -> Layout:
    """The layout ``run``'s config asks for on ``world_size`` ranks (default: trainer.devices x num_nodes)."""
    from nxdt.resolve import gradient_accumulation

    cfg = run.config
    dims = run.parallel_dims(world_size)
    granularity = cfg.model.activations_checkpoint_granularity or None
    return Layout(tp=dims.tp, pp=dims.pp, dp=dims.dp, ep=dims.ep, vpp=dims.vpp, cp=dims.cp,
                  sequence_parallel=dims.sequence_parallel, zero1=bool(cfg.distributed_strategy.zero1),
                  activation_checkpointing=granularity, micro_batch_size=cfg.data.micro_batch_size,
                  grad_accum=gradient_accumulation(cfg, dims.dp), kv_replicator=dims.kv_replicator,
                  schedule=cfg.distributed_strategy.pipeline_schedule)


def facts_of(run: Any, device_is_cpu: bool) -> Facts:
    """The run facts a plan reads from ``run``'s config."""
    cfg = run.config
    precision = cfg.precision.resolved(cfg.model.optim.name)
    alignment = cfg.model_alignment_strategy
    dpo, orpo = getattr(alignment, "dpo", None), getattr(alignment, "orpo", None)
    pairs = dpo is not None or orpo is not None
    peft = getattr(alignment, "peft", None)
    # DPO's live reference is a frozen copy of the weights, unless it is precomputed or the LoRA base
    reference = dpo is not None and peft is None and not getattr(dpo, "precompute_ref_log_probs", False)
    em = cfg.exp_manager
    params = em.checkpoint_callback_params
    saving = bool(em.create_checkpoint_callback) and params.saves_any()
    recipe = run.recipe
    masked = bool(cfg.data.reset_position_ids) or (recipe is not None and recipe.dataset != "pretrain")
    return Facts(
        seq_length=cfg.data.seq_length,
        param_bytes=2 if precision.param_dtype == "bf16" else 4,
        state_bytes=2 if precision.optimizer_state_dtype == "bf16" else 4,
        master_weights=precision.master_weights,
        fp32_grad_acc=precision.fp32_grad_acc,
        stochastic_rounding=precision.stochastic_rounding,
        autocast=precision.param_dtype == "fp32" and precision.compute_dtype == "bf16",
        rows_per_sample=2 if pairs else 1,
        hf_checkpoint_bytes=hf_checkpoint_bytes(cfg.model.hf_checkpoint),
        checkpoint=("async" if em.async_checkpointing else "sync") if saving else "none",
        reference_model=reference,
        flash=bool(cfg.model.fusions.flash_attention),
        masked=masked,
        device_is_cpu=device_is_cpu,
    )


def hf_checkpoint_bytes(path: str | None) -> int:
    """Bytes of an HF checkpoint's weight files (0 without one)."""
    if not path:
        return 0
    root = Path(path).expanduser()
    files = list(root.glob("*.safetensors")) or list(root.glob("*.bin"))
    return sum(f.stat().st_size for f in files)


def plan_memory(run: Any, *, layout: Layout | None = None, world_size: int | None = None,
                target: Device | str = "cpu", snapshot: ModelSnapshot | None = None, host: Any = None,
                facts: Facts | None = None, sharded_build: bool | None = None) -> MemoryPlan:
    """The memory plan of ``run`` under ``layout`` (default: the config's) on ``target``; ``sharded_build`` as in rank_memory."""
    from nxdt.plugin_host import get_host

    host = host or get_host()
    if sharded_build is None:
        # As nxdt.parallel.apply builds: sharded for families with a per-parameter init rule, else whole.
        sharded_build = run.spec.init_parameter is not None
    layout = layout or layout_of(run, world_size)
    if layout.cp > 1:
        raise ConfigError(f"distributed_strategy.context_parallel_size={layout.cp}: context parallelism is not "
                          "available, so the planner does not model it; set it to 1")
    dev = target if isinstance(target, Device) else device(target)
    snapshot = snapshot or snapshot_of(run, host)
    facts = facts or facts_of(run, dev.name == "cpu")
    if facts.device_is_cpu != (dev.name == "cpu"):
        facts = replace(facts, device_is_cpu=dev.name == "cpu")
    dims = layout.dims()
    plan = None
    if dims.tp > 1 or dims.ep > 1:
        try:
            plan = host.shard_plan(run.spec, run.arch, dims)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    ranks = place(snapshot, dims, plan, run.arch, run.config.model.pipeline_cuts)
    acts = activation_model(run.arch, facts.seq_length, dims.tp, dims.sequence_parallel, facts.param_bytes,
                            facts.autocast, facts.flash, facts.masked)
    memory = [rank_memory(r, layout, facts, acts, snapshot.full_bytes, snapshot.buffer_bytes, snapshot.largest,
                          sharded_build) for r in ranks]
    cpu = dev.name == "cpu"
    notes = [] if acts.modelled else [f"{run.family}: the architecture config has no hidden_size; activations are not modelled"]
    return MemoryPlan(run.source, layout, dev, facts, memory, snapshot.numel,
                      runtime_bytes=CPU_RUNTIME_BYTES if cpu else 0,
                      slack=CPU_ALLOCATOR_SLACK if cpu else CUDA_ALLOCATOR_SLACK, notes=notes,
                      sharded_build=sharded_build)
