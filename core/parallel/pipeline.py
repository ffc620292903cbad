"""Pipeline parallelism on ``torch.distributed.pipelining``: stage split, stage modules and schedules.

Every rank materializes the whole model (as apply.py does for all layouts), then keeps only the
blocks of its own stages: the *rank module*, whose parameter names stay those of the
single-device model, so the optimizer, ZeRO-1, norms and checkpoints see ordinary FQNs. Each
local stage is a shallow *view* of the rank module that drops the blocks of the rank's other
stages (interleaved schedules give a rank several). Top-level modules with parameters registered
before the block container (embeddings) live on the first stage, those after it (final norm, LM
head) on the last; parameterless ones (RoPE tables) on every stage. The family's ``forward`` must
pass hidden states through where such a module is None.

Stage ``s`` runs on pipeline rank ``s % pp`` (the loop placement the interleaved schedules
expect), so the first stage sits on pipeline rank 0 and the last on rank ``pp - 1``.
"""

from __future__ import annotations

import copy
import functools
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import PipelineScheduleSingle, get_schedule_class
from torch.distributed.tensor import DTensor

from nxdt.errors import ConfigError, NxdtError
from nxdt.parallel.grad_norm import align_grad_
from nxdt.parallel.model import ParallelModel, StepStats, model_inputs
from nxdt.parallel.stage_split import split_blocks
from nxdt.specs import LossOutput

#: schedules that place stage s and its mirror 2 * pp - 1 - s on one rank, unlike nxdt's loop placement
V_SCHEDULES = ("zbvzerobubble", "dualpipev")


# -- stage modules ---------------------------------------------------------------------------------
def _placement(model: nn.Module, blocks: Sequence[str]) -> tuple[str, list[str], list[str]]:
    """(block container name, top-level modules of the first stage, those of the last stage)."""
    container = blocks[0].split(".")[0]
    if not all(b.split(".")[0] == container and b.count(".") == 1 for b in blocks):
        raise ConfigError(f"pipeline: blocks {blocks[:2]}... must be the children of one top-level container")
    if not isinstance(getattr(model, container), nn.ModuleDict):
        raise ConfigError(
            f"pipeline: {type(model).__name__}.{container} must be an nn.ModuleDict so stages keep layer names"
        )
    names = [n for n, _ in model.named_children()]
    at = names.index(container)
    owned = [n for n in names if n != container and any(True for _ in getattr(model, n).parameters())]
    return container, [n for n in owned if names.index(n) < at], [n for n in owned if names.index(n) > at]


def _view(model: nn.Module, container: str, keep: Sequence[str], drop_top: Sequence[str]) -> nn.Module:
    """``model`` with only the blocks ``keep`` and the top-level modules ``drop_top`` set to None.

    A view shares every submodule and parameter with ``model``; only the root and the block
    container are new objects, so pruning the view leaves ``model`` whole.
    """
    view = copy.copy(model)
    view._modules = dict(model._modules)
    kept = {b.split(".", 1)[1] for b in keep}
    blocks = getattr(model, container)
    setattr(view, container, nn.ModuleDict({k: m for k, m in blocks.items() if k in kept}))
    for name in drop_top:
        setattr(view, name, None)
    return view


@dataclass(frozen=True)
class StagePlan:
    """Which blocks each stage runs, which stages this rank holds, and what sits on the end stages."""

    layout: list[list[str]]
    stage_ids: list[int]
    container: str
    first_only: list[str]
    last_only: list[str]
    tied: list[str]
    #: tied FQN -> the FQN the single-device model lists it under (the first), for checkpoint keys
    aliases: dict[str, str] = field(default_factory=dict)

    @property
    def n_stages(self) -> int:
        """Stages over the whole pipeline (pipeline ranks x virtual stages)."""
        return len(self.layout)


def prune_to_rank(model: nn.Module, plan: StagePlan) -> None:
    """Delete from ``model`` the blocks and end-stage modules of stages this rank does not hold."""
    mine = {b for s in plan.stage_ids for b in plan.layout[s]}
    holder = getattr(model, plan.container)
    for key in [k for k in holder if f"{plan.container}.{k}" not in mine]:
        del holder[key]
    if 0 not in plan.stage_ids:
        for name in plan.first_only:
            setattr(model, name, None)
    if plan.n_stages - 1 not in plan.stage_ids:
        for name in plan.last_only:
            setattr(model, name, None)


def stage_views(model: nn.Module, plan: StagePlan) -> list[nn.Module]:
    """One view of the (pruned, sharded, wrapped) rank module per local stage."""
    views = []
    for s in plan.stage_ids:
        drop = [*(plan.first_only if s != 0 else []), *(plan.last_only if s != plan.n_stages - 1 else [])]
        views.append(_view(model, plan.container, plan.layout[s], drop))
    return views


def _plain_tuple_outputs(view: nn.Module) -> nn.Module:
    """``view`` returning a plain tuple where the model returns a NamedTuple (outputs of several heads).

    torch.distributed.pipelining takes a Tensor or a plain tuple of Tensors from a stage and would
    treat a NamedTuple as one Tensor; the objective receives the plain tuple.
    """
    forward = view.forward

    @functools.wraps(forward)
    def plain(*args: Any, **kwargs: Any) -> Any:
        out = forward(*args, **kwargs)
        return tuple(out) if isinstance(out, tuple) and type(out) is not tuple else out

    view.forward = plain  # type: ignore[method-assign]
    return view


# -- the pipelined model ---------------------------------------------------------------------------
def schedule_class(name: str | None, virtual: int) -> type:
    """The torch schedule called ``name``; Interleaved1F1B with virtual stages, else 1F1B."""
    name = name or ("Interleaved1F1B" if virtual > 1 else "1F1B")
    try:
        cls = get_schedule_class(name)
    except ValueError as exc:
        raise ConfigError(f"distributed_strategy.pipeline_schedule: {exc}") from exc
    if name.lower() in V_SCHEDULES:
        raise ConfigError(
            f"distributed_strategy.pipeline_schedule={name} needs V-shaped stage placement; nxdt places stages "
            "in a loop (stage s on pipeline rank s % pp): use Interleaved1F1B, InterleavedZeroBubble, 1F1B or GPipe"
        )
    if issubclass(cls, PipelineScheduleSingle) and virtual > 1:
        raise ConfigError(
            f"distributed_strategy.pipeline_schedule={name} runs one stage per rank, but "
            f"virtual_pipeline_model_parallel_size={virtual}; pick a multi-stage schedule such as Interleaved1F1B"
        )
    return cls


class PipelineModel(ParallelModel):
    """A ParallelModel whose forward and backward run through a torch pipeline schedule."""

    def __init__(
        self,
        module: nn.Module,
        plan: StagePlan,
        *,
        schedule: str | None,
        n_microbatches: int,
        device: torch.device,
        stage_inputs: Sequence[str] = ("position_ids",),
        **kwargs: Any,
    ):
        super().__init__(module, None, **kwargs)
        parallel = kwargs["parallel"]
        self.pp = parallel.pp
        self.pp_mesh = self.mesh["pp"]
        self.pp_group = self.pp_mesh.get_group()
        self.has_last = plan.n_stages - 1 in plan.stage_ids
        self.stage_inputs = tuple(stage_inputs)
        self.stages = [
            PipelineStage(_plain_tuple_outputs(view), s, plan.n_stages, device, group=self.pp_group)
            for view, s in zip(stage_views(module, plan), plan.stage_ids)
        ]
        cls = schedule_class(schedule, parallel.vpp)
        first = self.stages[0] if issubclass(cls, PipelineScheduleSingle) else self.stages
        # Our loss is already divided by the global normaliser: the schedule must not rescale.
        self.schedule = cls(first, n_microbatches, loss_fn=self._stage_loss, scale_grads=False)
        self.n_microbatches = n_microbatches
        self._step: dict[str, Any] = {}
        self.tied_params = [r.param for r in self.records if r.tie is not None]
        self.tie_group = self._tie_group() if plan.tied else None

    # -- tied input and output embeddings ------------------------------------------------------
    def _tie_group(self) -> Any:
        """The group of this rank's first and last pipeline ranks (which hold the two halves of a tie)."""
        mesh = self.mesh.mesh  # ranks laid out (pp, dp, cp, tp)
        group = None
        # new_group is collective over the world: every rank creates every pair in the same order.
        for coord in itertools.product(*(range(n) for n in mesh.shape[1:])):
            ranks = sorted({int(mesh[(0, *coord)]), int(mesh[(-1, *coord)])})
            g = dist.new_group(ranks)
            if dist.get_rank() in ranks:
                group = g
        return group

    @torch.no_grad()
    def finalize_gradients(self) -> None:
        """Sum the tied embedding's gradient over its two stages, then sync as any layout does."""
        if self.tie_group is not None and self.tied_params:
            for p in self.tied_params:
                align_grad_(p)
            for g in self._local_grads(self.tied_params):
                dist.all_reduce(g, group=self.tie_group)
        super().finalize_gradients()

    # -- forward, backward and loss ------------------------------------------------------------
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Not available: under pipeline parallelism no rank holds the whole model."""
        raise NxdtError(
            "pipeline parallelism: the whole-model forward is unavailable; use forward_backward/forward_loss"
        )

    def auxiliary_loss(self) -> torch.Tensor | None:
        """No model-level auxiliary loss crosses stages; layers attach theirs to the activations (kit MoE)."""
        return None

    def _stage_loss(self, outputs: Any, rows: torch.Tensor) -> torch.Tensor:
        """The schedule's per-micro-batch loss on the last stage: the objective sees the whole micro-batch.

        The schedule's "target" is each micro-batch's row indices into the step's batch, so the
        objective receives every batch key (labels, masks, pair ids), not only one target tensor.
        """
        batch = {k: v[rows] for k, v in self._step["batch"].items()}
        out = self.compute_loss(self._step["objective"], outputs, batch)
        self._step["outs"].append(out)
        return out.loss * self._step["scale"]

    def _run(
        self, micro_batches: list[dict[str, torch.Tensor]], objective: Any, scale: Any, train: bool
    ) -> StepStats:
        """One schedule pass over ``micro_batches``; the sums are handed to every pipeline rank."""
        batch = {k: torch.cat([mb[k] for mb in micro_batches]) for k in micro_batches[0]}
        input_ids = batch["input_ids"]
        kwargs = model_inputs(batch, [k for k in self.inputs if k != "input_ids"])
        if "position_ids" in self.inputs and "position_ids" not in kwargs:
            # Every stage needs positions (RoPE, masks); the schedule splits them like the inputs.
            kwargs["position_ids"] = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(
                input_ids
            )
        self._step = {"objective": objective, "scale": scale, "outs": [], "batch": batch}
        run = self.schedule.step if train else self.schedule.eval
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        with self.loss_parallel():
            # Keyword inputs reach every stage (positional ones only the first).
            run(input_ids, **kwargs, target=rows, return_outputs=False)
        # The schedule's first step also calls the loss on placeholder activations to infer
        # gradient shapes; the micro-batches' own losses are the last n_microbatches calls.
        outs = self._step["outs"][-self.n_microbatches :] if self.has_last else []
        stats = StepStats(torch.zeros((), device=input_ids.device))
        for out in outs:
            stats.add(out)
        if train:
            # This rank's stages' module metrics (MoE load), of the real micro-batches only.
            self.add_module_metrics(stats, last=self.n_microbatches)
        return self._share_last_stage(stats, objective)

    def _share_last_stage(self, stats: StepStats, objective: Any) -> StepStats:
        """Only the last stage computed the loss: a sum over the pipeline hands it to every rank.

        Module metrics (an MoE layer's load) come from whichever stage holds the module.
        """
        every: list[Any] = [None] * self.pp
        # Each pipeline rank knows its metric names; all learn the union before the sum.
        dist.all_gather_object(every, sorted(stats.metrics), group=self.pp_group)
        names = sorted({n for part in every for n in part})
        device = stats.loss.device
        flat = torch.cat(
            [stats.loss.reshape(1).float()]
            + [stats.metrics.get(n, torch.zeros(2, device=device)) for n in names]
        )
        dist.all_reduce(flat, group=self.pp_group)
        return StepStats(flat[0], {n: flat[1 + 2 * i : 3 + 2 * i] for i, n in enumerate(names)})

    def forward_backward(
        self,
        micro_batches: list[dict[str, torch.Tensor]],
        objective: Any,
        scale: float | torch.Tensor,
        autocast: Callable[[], Any],
        aux_scale: float = 1.0,
    ) -> StepStats:
        """Run the step's micro-batches through the training schedule; returns this DP rank's sums."""
        self.set_aux_loss_scale(aux_scale)
        with autocast():
            return self._run(micro_batches, objective, scale, train=True)

    @torch.no_grad()
    def forward_loss(
        self, micro_batches: list[dict[str, torch.Tensor]], objective: Any, autocast: Callable[[], Any]
    ) -> tuple[StepStats, torch.Tensor]:
        """Forward-only schedule passes over ``micro_batches`` (a multiple of n_microbatches): sums and units."""
        n = self.n_microbatches
        if len(micro_batches) % n:
            raise NxdtError(
                f"pipeline validation: {len(micro_batches)} micro-batches are not a multiple of {n}"
            )
        total: StepStats | None = None
        with autocast():
            for i in range(0, len(micro_batches), n):
                part = self._run(micro_batches[i : i + n], objective, 1.0, train=False)
                if total is None:
                    total = part
                else:
                    total.loss = total.loss + part.loss
                    for k, v in part.metrics.items():
                        total.metrics[k] = total.metrics[k] + v if k in total.metrics else v
        units = torch.stack([objective.count(mb).float() for mb in micro_batches]).sum()
        assert total is not None
        return total, units

    @torch.no_grad()
    def forward_rows(
        self,
        micro_batches: list[dict[str, torch.Tensor]],
        fn: Callable[[Any, Any], torch.Tensor],
        autocast: Callable[[], Any],
    ) -> list[torch.Tensor]:
        """Per-row values computed on the last stage, then broadcast to every pipeline rank."""
        capture = _RowCapture(fn)
        self.forward_loss(micro_batches, capture, autocast)
        sizes = [mb["input_ids"].shape[0] for mb in micro_batches]
        device = micro_batches[0]["input_ids"].device
        # The last stage saw the micro-batches in order (its last calls); the other ranks receive them.
        flat = (
            torch.cat(capture.rows[-len(micro_batches) :])
            if self.has_last
            else torch.zeros(sum(sizes), device=device)
        )
        dist.broadcast(flat, src=dist.get_global_rank(self.pp_group, self.pp - 1), group=self.pp_group)
        return list(flat.split(sizes))

    # -- norms and export ----------------------------------------------------------------------
    @torch.no_grad()
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Every stage's unsharded parameters, gathered over the pipeline (tied pairs under both names)."""
        local = super().full_state_dict()
        parts: list[Any] = [None] * self.pp
        dist.all_gather_object(parts, {k: v.cpu() for k, v in local.items()}, group=self.pp_group)
        out: dict[str, torch.Tensor] = {}
        for part in parts:
            out.update(part)
        return out


class _RowCapture:
    """An objective for :meth:`PipelineModel.forward_rows`: records ``fn``'s per-row values, adds no loss."""

    def __init__(self, fn: Callable[[Any, Any], torch.Tensor]):
        self.fn, self.rows = fn, []  # type: ignore[var-annotated]

    def count(self, batch: Any) -> torch.Tensor:
        """Rows of the micro-batch (only the forward matters here)."""
        return torch.tensor(batch["input_ids"].shape[0])

    def __call__(self, outputs: Any, batch: Any) -> LossOutput:
        """Record the rows' values; the loss is zero."""
        values = self.fn(outputs, batch)
        values = values.full_tensor() if isinstance(values, DTensor) else values
        self.rows.append(values.detach().float())
        return LossOutput(torch.zeros((), device=values.device))


def plan_pipeline(model: nn.Module, ctx: Any) -> StagePlan:
    """This rank's StagePlan for ``model``, from the family's blocks and ``model.pipeline_cuts``."""
    run, parallel, mesh, cfg = ctx.run, ctx.parallel, ctx.mesh, ctx.cfg
    if run.spec.pipeline_blocks is None:
        raise ConfigError(f"{run.family}: the family declares no pipeline_blocks, so it cannot be pipelined")
    blocks = run.spec.pipeline_blocks(run.arch)
    n_stages = parallel.pp * parallel.vpp
    layout = split_blocks(blocks, n_stages, cfg.model.pipeline_cuts)
    container, first_only, last_only = _placement(model, blocks)
    stage_ids = list(range(mesh["pp"].get_local_rank(), n_stages, parallel.pp))
    return StagePlan(
        layout, stage_ids, container, first_only, last_only, _tied_names(model), _tied_aliases(model)
    )


def _tied_names(model: nn.Module) -> list[str]:
    """FQNs of parameters shared by two modules (a tied embedding and LM head), all names of each."""
    seen: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        seen.setdefault(id(p), []).append(name)
    return [n for names in seen.values() if len(names) > 1 for n in names]


def _tied_aliases(model: nn.Module) -> dict[str, str]:
    """Each tied FQN -> the first name of its parameter, the only one ``named_parameters()`` lists."""
    first: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        first.setdefault(id(p), name)
    return {
        name: first[id(p)]
        for name, p in model.named_parameters(remove_duplicate=False)
        if name != first[id(p)]
    }
