"""``ParallelModel``: the trainer's one handle on a parallelized model, whatever the layout.

Gradient convention (DDP's): after :meth:`ParallelModel.finalize_gradients` every DP rank holds
the DP *average* of the gradients; the trainer scales each micro-batch's loss sum by
``dp / global_units`` (tokens, pairs: the objective's normaliser over the whole global batch) so
that average is the gradient of the global mean loss. What each parameter needs (its sync group,
its replica count for norms, KV replication, tie partner) comes from the per-parameter record.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from nxdt.parallel import grad_norm
from nxdt.parallel.grad_norm import local_tensor
from nxdt.parallel.param_record import ParamTable, build_param_table, clean_name
from nxdt.specs import LossOutput


@dataclass
class StepStats:
    """Sums a forward(-backward) pass accumulated over micro-batches (this rank's share)."""

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> stacked (sum, count)

    def add(self, out: LossOutput) -> None:
        """Accumulate one micro-batch's loss and metrics."""
        self.loss = self.loss + out.loss.detach().float()
        for name, (value, count) in out.metrics.items():
            pair = torch.stack([_plain(value).detach().float(), _plain(count).detach().float()])
            self.metrics[name] = self.metrics[name] + pair if name in self.metrics else pair


def _plain(t: torch.Tensor | float) -> torch.Tensor:
    if isinstance(t, DTensor):
        return t.full_tensor()
    return t if isinstance(t, torch.Tensor) else torch.tensor(float(t))


def model_inputs(batch: Mapping[str, torch.Tensor], inputs: Sequence[str]) -> dict[str, torch.Tensor]:
    """The batch entries the model declares as its ``inputs``."""
    return {k: batch[k] for k in inputs if k in batch and batch[k] is not None}


class ParallelModel:
    """Forward, loss, gradient sync, clipping and norms of a model that may be sharded and DP-wrapped."""

    def __init__(
        self,
        module: nn.Module,
        ddp: nn.Module | None = None,
        *,
        mesh: Any = None,
        parallel: Any = None,
        precision: Any = None,
        zero1: bool = False,
        flat_optimizer: bool = False,
        records: ParamTable | None = None,
        inputs: Sequence[str] = ("input_ids", "position_ids"),
        seed: int = 0,
    ):
        self.trainable_module = module
        self.ddp = ddp
        self.mesh = mesh
        self.tp = parallel.tp if parallel is not None else 1
        self.dp = parallel.dp if parallel is not None else 1
        self.tp_mesh = mesh["tp"] if mesh is not None and self.tp > 1 else None
        self.dp_mesh = mesh["dp"] if mesh is not None and self.dp > 1 else None
        self.dp_group = self.dp_mesh.get_group() if self.dp_mesh is not None else None
        self.tp_group = self.tp_mesh.get_group() if self.tp_mesh is not None else None
        # Expert parallelism: experts differ across "ep" ranks and are replicated over "edp" only.
        self.ep = parallel.ep if parallel is not None else 1
        self.ep_group = mesh["ep"].get_group() if self.ep > 1 else None
        self.edp_mesh = mesh["edp"] if self.ep > 1 and self.dp > self.ep else None
        # Set by pipelined layouts: each pipeline rank holds other parameters, so norms sum over it.
        self.pp_group: Any = None
        self.precision = precision
        self.zero1 = zero1
        self.flat_optimizer = flat_optimizer
        self.seed = seed
        self.inputs = tuple(inputs)
        self.optimizer: Any = None
        self.records = records if records is not None else build_param_table(module, self.tp)
        kv = self.records.kv_replicated()
        self.kv_heads = kv[0].kv_heads if kv else 1
        self.kv_replicas = kv[0].kv_replicas if kv else 1
        #: modules reporting per-step metrics (MoE load) and taking the router losses' gradient weight
        self.metric_modules = [m for m in module.modules() if hasattr(m, "nxdt_step_metrics")]
        self.aux_modules = [m for m in module.modules() if hasattr(m, "nxdt_aux_loss_scale")]

    # -- views the checkpoint code reads ------------------------------------------------------------
    @property
    def kv_params(self) -> list[nn.Parameter]:
        """Parameters whose rows hold replicated KV heads."""
        return [r.param for r in self.records.kv_replicated()]

    @property
    def checkpoint_aliases(self) -> dict[str, str]:
        """Local name -> canonical (saved) name where they differ."""
        return {r.local_name: r.name for r in self.records if r.name != r.local_name}

    @property
    def norm_weight(self) -> dict[int, float]:
        """id(parameter) -> its weight in norms (1 / identical copies)."""
        return {id(r.param): r.norm_weight for r in self.records}

    # -- forward and loss ----------------------------------------------------------------------
    def __call__(self, input_ids: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                 **inputs: torch.Tensor) -> Any:
        """The model's outputs for keyword ``inputs`` (logits are a vocabulary-sharded DTensor under TP)."""
        runner = self.ddp if self.ddp is not None else self.trainable_module
        if input_ids is not None:
            inputs["input_ids"] = input_ids
        if position_ids is not None:
            inputs["position_ids"] = position_ids
        return runner(**inputs)

    def forward_backward(
        self,
        micro_batches: list[dict[str, torch.Tensor]],
        objective: Any,
        scale: float | torch.Tensor,
        autocast: Callable[[], Any],
        aux_scale: float = 1.0,
    ) -> StepStats:
        """Forward and backward of each micro-batch, its loss sum scaled by ``scale``; returns the sums.

        A model's auxiliary loss (MoE load balancing) is weighted by ``aux_scale`` (1 / micro-batches
        per step), so it counts once per optimizer step however the batch is split.
        """
        stats = StepStats(torch.zeros((), device=micro_batches[0]["input_ids"].device))
        self.set_aux_loss_scale(aux_scale)
        for i, mb in enumerate(micro_batches):
            with self.no_sync(i < len(micro_batches) - 1), autocast(), self.loss_parallel():
                outputs = self(**model_inputs(mb, self.inputs))
                out = self.compute_loss(objective, outputs, mb)
                total = out.loss * scale
                aux = self.auxiliary_loss()
                if aux is not None:
                    total = total + aux * aux_scale
                    out.metrics.setdefault("aux_loss", (aux.detach(), torch.ones((), device=aux.device)))
                total.backward()
            stats.add(out)
        self.add_module_metrics(stats)
        return stats

    @torch.no_grad()
    def forward_loss(
        self, micro_batches: list[dict[str, torch.Tensor]], objective: Any, autocast: Callable[[], Any]
    ) -> tuple[StepStats, torch.Tensor]:
        """Forward-only sums over ``micro_batches`` and their normaliser units."""
        stats = StepStats(torch.zeros((), device=micro_batches[0]["input_ids"].device))
        units = torch.zeros((), device=stats.loss.device)
        for mb in micro_batches:
            with autocast(), self.loss_parallel():
                outputs = self(**model_inputs(mb, self.inputs))
                stats.add(self.compute_loss(objective, outputs, mb))
            units += objective.count(mb).float()
        return stats, units

    @torch.no_grad()
    def forward_rows(
        self, micro_batches: list[dict[str, torch.Tensor]], fn: Callable[[Any, Mapping[str, torch.Tensor]], torch.Tensor],
        autocast: Callable[[], Any],
    ) -> list[torch.Tensor]:
        """Forward-only per-row values: ``fn(outputs, micro_batch) -> [rows]`` of each micro-batch, on every rank.

        ``fn`` runs where the loss would (under loss parallelism; on the last stage of a pipeline),
        so it may read vocabulary-sharded logits; a frozen reference model's log-probs are the use.
        """
        out = []
        for mb in micro_batches:
            with autocast(), self.loss_parallel():
                out.append(_plain(fn(self(**model_inputs(mb, self.inputs)), mb)).float())
        return out

    def loss_parallel(self):
        """Context for the loss forward *and* backward: cross-entropy on vocabulary-sharded logits."""
        if self.tp > 1:
            from torch.distributed.tensor.parallel import loss_parallel

            return loss_parallel()
        return contextlib.nullcontext()

    def compute_loss(self, objective: Any, outputs: Any, batch: Mapping[str, torch.Tensor]) -> LossOutput:
        """``objective(outputs, batch)`` with the (replicated) loss returned as a plain tensor."""
        out = objective(outputs, batch)
        if isinstance(out.loss, DTensor):
            out.loss = out.loss.full_tensor()
        return out

    def no_sync(self, skip_sync: bool):
        """Suppress the DP gradient all-reduce for accumulation micro-batches."""
        if self.ddp is not None and skip_sync:
            return self.ddp.no_sync()  # type: ignore[operator]
        # Without DDP gradients are only synchronised in finalize_gradients, once per step.
        return contextlib.nullcontext()

    def auxiliary_loss(self) -> torch.Tensor | None:
        """An extra loss term the model computed in its forward (MoE load balancing), if any."""
        return getattr(self.trainable_module, "aux_loss", None)

    def set_aux_loss_scale(self, scale: float) -> None:
        """The gradient weight of losses modules attach to their outputs (the kit's MoE router losses)."""
        for m in self.aux_modules:
            setattr(m, "nxdt_aux_loss_scale", scale)  # noqa: B010

    def add_module_metrics(self, stats: StepStats, last: int | None = None) -> None:
        """Add the step's module metrics (MoE expert load, router losses) to ``stats`` as (sum, count) pairs."""
        for m in self.metric_modules:
            metrics: Any = getattr(m, "nxdt_step_metrics")  # noqa: B009
            for name, (value, count) in metrics(last).items():
                pair = torch.stack([_plain(value).detach().float(), _plain(count).detach().float()]).to(stats.loss.device)
                stats.metrics[name] = stats.metrics[name] + pair if name in stats.metrics else pair

    # -- optimizer -----------------------------------------------------------------------------
    def build_optimizer(self, build: Any, optim_cfg: Any, do_layer_norm_weight_decay: bool) -> torch.optim.Optimizer:
        """``build(module, optim_cfg, ...)`` for plain layouts; the flat DP-sharded AdamW for ZeRO-1 / bf16 weights."""
        if not self.flat_optimizer:
            self.optimizer = build(self.trainable_module, optim_cfg, do_layer_norm_weight_decay)
            return self.optimizer
        from nxdt.errors import ConfigError
        from nxdt.parallel.zero1 import ADAMW_NAMES, FlatShardedAdamW, decay_groups

        name = optim_cfg.name or "adamw"
        if name not in ADAMW_NAMES:
            raise ConfigError(f"model.optim.name: unsupported optimizer {name!r}; supported: {', '.join(ADAMW_NAMES)}")
        groups = decay_groups(self.records.trainable(), optim_cfg.weight_decay or 0.0, bool(do_layer_norm_weight_decay))
        # ZeRO-1 shards each weight's optimizer state over the group that syncs it (experts: edp).
        self.optimizer = FlatShardedAdamW(
            groups,
            lr=optim_cfg.lr,
            betas=tuple(optim_cfg.betas or (0.9, 0.95)),
            eps=getattr(optim_cfg, "eps", None) or 1e-8,
            precision=self.precision,
            dp_mesh=self.dp_mesh if self.zero1 else None,
            seed=self.seed,
            sync={r.local_name: r.sync for r in self.records.trainable()},
            sync_meshes={"edp": self.edp_mesh if self.zero1 else None},
            grad_divisor=self.dp,
        )
        self._norm_weight_shards = self.optimizer.flat_like(self.norm_weight)
        return self.optimizer

    # -- gradients -----------------------------------------------------------------------------
    def _local_grads(self, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if self.flat_optimizer:
            return self.optimizer.local_grads(params)
        return [local_tensor(p.grad) for p in params if p.grad is not None]

    @torch.no_grad()
    def finalize_gradients(self) -> None:
        """Sum replicated-KV gradients over their copies, then average gradients over DP (unless DDP did)."""
        trainable = [r.param for r in self.records.trainable()]
        for p in trainable:
            grad_norm.align_grad_(p)
        kv = [p for p in self.kv_params if p.requires_grad]
        if self.kv_replicas > 1 and kv:
            from nxdt.parallel.kv_replication import sum_replica_grads_

            sum_replica_grads_(self._local_grads(kv), self.kv_heads, self.kv_replicas, self.tp_mesh)
        if self.flat_optimizer:
            # Non-ZeRO flat optimizers own one shard per rank: they still need the DP average.
            self.optimizer.reduce_gradients()
            if not self.zero1 and self.dp_group is not None:
                for g, sync in zip(self.optimizer.shard_grads(), self.optimizer.shard_syncs()):
                    group = self._sync_group(sync)
                    if group is not None:
                        dist.all_reduce(g, group=group)
                    g.div_(self.dp)
        elif self.ddp is None and self.dp_group is not None:
            for sync in sorted({r.sync for r in self.records.trainable()}):
                grads = self._local_grads([r.param for r in self.records.trainable() if r.sync == sync])
                # Experts sum over edp and divide by the whole DP size: their gradient already
                # holds the tokens of every ep rank (the all-to-all's backward brought them).
                _all_reduce_mean_coalesced(grads, self._sync_group(sync), self.dp)

    def _sync_group(self, sync: str) -> Any:
        """The process group that averages gradients of parameters synced over ``sync`` (None: one rank)."""
        if sync == "edp":
            return self.edp_mesh.get_group() if self.edp_mesh is not None else None
        return self.dp_group

    def clip_grad_norm(self, max_norm: float | None) -> float:
        """True global gradient norm (replicated values counted once); clip to ``max_norm`` when given."""
        if self.flat_optimizer:
            grads = self.optimizer.shard_grads()
            weights, syncs = self._norm_weight_shards[: len(grads)], self.optimizer.shard_syncs()
            # Under ZeRO-1 the DP sum adds every shard once, experts' included (edp x ep = dp).
            sq = self._distinct_sq(grads, weights, syncs, over_ep=not self.zero1)
            groups = [self.dp_group if self.zero1 else None, self.tp_group, self.pp_group]
        else:
            records = [r for r in self.records.trainable() if r.param.grad is not None]
            grads = [local_tensor(r.param.grad) for r in records]
            sq = self._distinct_sq(grads, [r.norm_weight for r in records], [r.sync for r in records])
            groups = [self.tp_group, self.pp_group]
        total = grad_norm.reduce_norm(sq, groups)
        grad_norm.clip_(grads, total, max_norm)
        return total

    @torch.no_grad()
    def parameter_norm(self) -> float:
        """L2 norm of all parameters, replicated values counted once."""
        if not len(self.records):
            return 0.0
        records = list(self.records)
        sq = self._distinct_sq([local_tensor(r.param) for r in records], [r.norm_weight for r in records],
                               [r.sync for r in records])
        return grad_norm.reduce_norm(sq, [self.tp_group, self.pp_group])

    def _distinct_sq(self, tensors: list[torch.Tensor], weights: list[Any], syncs: list[str],
                     over_ep: bool = True) -> torch.Tensor:
        """Weighted squared sum in which experts held by other EP ranks count too (summed over ``ep``)."""
        if self.ep_group is None or not over_ep or "edp" not in syncs:
            return grad_norm.weighted_sq_sum(tensors, weights)
        dense = [i for i, s in enumerate(syncs) if s != "edp"]
        expert = [i for i, s in enumerate(syncs) if s == "edp"]
        sq = grad_norm.weighted_sq_sum([tensors[i] for i in expert], [weights[i] for i in expert])
        dist.all_reduce(sq, group=self.ep_group)
        return sq + grad_norm.weighted_sq_sum([tensors[i] for i in dense], [weights[i] for i in dense])

    # -- export --------------------------------------------------------------------------------
    @torch.no_grad()
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Unsharded parameters under single-device FQNs, each KV head once (for HF export and tests)."""
        from nxdt.parallel.kv_replication import unreplicate_kv

        out = {}
        for r in self.records:
            p = r.param
            full = p.full_tensor() if isinstance(p, DTensor) else p.detach()
            if r.is_kv_replicated:
                full = unreplicate_kv(full, r.kv_heads, r.kv_replicas)
            out[r.local_name] = full.clone()
        return out

    def train(self) -> None:
        """Training mode."""
        self.trainable_module.train()

    def eval(self) -> None:
        """Evaluation mode."""
        self.trainable_module.eval()


def _all_reduce_mean_coalesced(tensors: list[torch.Tensor], group: Any, size: int) -> None:
    """Sum ``tensors`` over ``group`` (None: this rank alone) and divide by ``size``, one flat all-reduce per dtype."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for same in by_dtype.values():
        flat = torch.cat([t.reshape(-1) for t in same])
        if group is not None:
            dist.all_reduce(flat, group=group)
        flat.div_(size)
        offset = 0
        for t in same:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()


__all__ = ["ParallelModel", "StepStats", "clean_name", "model_inputs"]
