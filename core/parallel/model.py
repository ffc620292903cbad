"""``ParallelModel``: the trainer's one handle on a parallelized model, whatever the layout.

Gradient convention (DDP's): after :meth:`ParallelModel.finalize_gradients` every DP rank holds
the DP *average* of the gradients; the trainer scales the loss by ``dp / global_tokens`` so that
average is the gradient of the global token-mean loss.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from nxdt.parallel import grad_norm
from nxdt.parallel.grad_norm import local_tensor

_WRAPPER_PREFIX = "_checkpoint_wrapped_module."


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
        kv: tuple[list[str], int, int] | None = None,
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
        # Set by pipelined layouts: each pipeline rank holds other parameters, so norms sum over it.
        self.pp_group: Any = None
        self.precision = precision
        self.zero1 = zero1
        self.flat_optimizer = flat_optimizer
        self.seed = seed
        self.optimizer: Any = None
        names = {id(p): n.replace(_WRAPPER_PREFIX, "") for n, p in module.named_parameters()}
        self.kv_heads, self.kv_replicas = (kv[1], kv[2]) if kv else (1, 1)
        kv_names = set(kv[0]) if kv else set()
        self.kv_params = [p for p in module.parameters() if names[id(p)] in kv_names]
        # 1 / (TP ranks holding an identical copy) per parameter: norms count each value once.
        self.norm_weight = {
            id(p): 1.0
            / grad_norm.tp_replica_count(p, self.tp, self.kv_replicas, is_kv=names[id(p)] in kv_names)
            for p in module.parameters()
        }

    # -- forward and loss ----------------------------------------------------------------------
    def __call__(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of ``input_ids`` (a vocabulary-sharded DTensor under TP)."""
        runner = self.ddp if self.ddp is not None else self.trainable_module
        return runner(input_ids, position_ids)

    def forward_backward(
        self, micro_batches: list[dict[str, torch.Tensor]], loss_fn: Any, scale: float | torch.Tensor, autocast: Any
    ) -> torch.Tensor:
        """Forward and backward of each micro-batch, the loss scaled by ``scale``; returns the loss sum."""
        loss_sum = torch.zeros((), device=micro_batches[0]["input_ids"].device)
        for i, mb in enumerate(micro_batches):
            with self.no_sync(i < len(micro_batches) - 1), autocast(), self.loss_parallel():
                logits = self(mb["input_ids"], mb.get("position_ids"))
                mb_loss, _ = self.compute_loss(loss_fn, logits, mb)
                aux = self.auxiliary_loss()
                (mb_loss * scale + (aux if aux is not None else 0.0)).backward()
            loss_sum += mb_loss.detach().float()
        return loss_sum

    @torch.no_grad()
    def forward_loss(
        self, micro_batches: list[dict[str, torch.Tensor]], loss_fn: Any, autocast: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward-only (loss sum, token count) over ``micro_batches``."""
        loss_sum = torch.zeros((), device=micro_batches[0]["input_ids"].device)
        tokens = torch.zeros((), device=loss_sum.device)
        for mb in micro_batches:
            with autocast(), self.loss_parallel():
                logits = self(mb["input_ids"], mb.get("position_ids"))
                mb_loss, n = self.compute_loss(loss_fn, logits, mb)
            loss_sum += mb_loss.float()
            tokens += n
        return loss_sum, tokens

    def loss_parallel(self):
        """Context for the loss forward *and* backward: cross-entropy on vocabulary-sharded logits."""
        if self.tp > 1:
            from torch.distributed.tensor.parallel import loss_parallel

            return loss_parallel()
        return contextlib.nullcontext()

    def compute_loss(self, loss_fn: Any, logits: torch.Tensor, batch: dict[str, torch.Tensor]):
        """``loss_fn(logits, batch)`` with the (replicated) loss returned as a plain tensor."""
        loss, n = loss_fn(logits, batch)
        if isinstance(loss, DTensor):
            loss = loss.full_tensor()
        return loss, n

    def no_sync(self, skip_sync: bool):
        """Suppress the DP gradient all-reduce for accumulation micro-batches."""
        if self.ddp is not None and skip_sync:
            return self.ddp.no_sync()  # type: ignore[operator]
        # Without DDP gradients are only synchronised in finalize_gradients, once per step.
        return contextlib.nullcontext()

    def auxiliary_loss(self) -> torch.Tensor | None:
        """An extra loss term the model computed in its forward (MoE load balancing), if any."""
        return getattr(self.trainable_module, "aux_loss", None)

    # -- optimizer -----------------------------------------------------------------------------
    def build_optimizer(self, build: Any, optim_cfg: Any, do_layer_norm_weight_decay: bool) -> torch.optim.Optimizer:
        """``build(module, optim_cfg, ...)`` for plain layouts; the flat DP-sharded AdamW for ZeRO-1 / bf16 weights."""
        if not self.flat_optimizer:
            self.optimizer = build(self.trainable_module, optim_cfg, do_layer_norm_weight_decay)
            return self.optimizer
        from nxdt.errors import ConfigError
        from nxdt.parallel.zero1 import FlatShardedAdamW
        from nxdt.train.optim import ADAMW_NAMES, param_groups

        name = optim_cfg.name or "adamw"
        if name not in ADAMW_NAMES:
            raise ConfigError(f"model.optim.name: unsupported optimizer {name!r}; supported: {', '.join(ADAMW_NAMES)}")
        names = {id(p): n.replace(_WRAPPER_PREFIX, "") for n, p in self.trainable_module.named_parameters()}
        groups = param_groups(self.trainable_module, optim_cfg.weight_decay or 0.0, bool(do_layer_norm_weight_decay))
        named = [
            {"names": [names[id(p)] for p in g["params"]], "params": g["params"], "weight_decay": g["weight_decay"]}
            for g in groups
            if g["params"]
        ]
        self.optimizer = FlatShardedAdamW(
            named,
            lr=optim_cfg.lr,
            betas=tuple(optim_cfg.betas or (0.9, 0.95)),
            eps=getattr(optim_cfg, "eps", None) or 1e-8,
            precision=self.precision,
            dp_mesh=self.dp_mesh if self.zero1 else None,
            seed=self.seed,
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
        for p in self.trainable_module.parameters():
            grad_norm.align_grad_(p)
        if self.kv_replicas > 1:
            from nxdt.parallel.kv_replication import sum_replica_grads_

            sum_replica_grads_(self._local_grads(self.kv_params), self.kv_heads, self.kv_replicas, self.tp_mesh)
        if self.flat_optimizer:
            # Non-ZeRO flat optimizers own one shard per rank: they still need the DP average.
            self.optimizer.reduce_gradients()
            if not self.zero1 and self.dp_group is not None:
                for g in self.optimizer.shard_grads():
                    dist.all_reduce(g, group=self.dp_group)
                    g.div_(self.dp)
        elif self.ddp is None and self.dp_group is not None:
            grads = self._local_grads(list(self.trainable_module.parameters()))
            _all_reduce_mean_coalesced(grads, self.dp_group, self.dp)

    def clip_grad_norm(self, max_norm: float | None) -> float:
        """True global gradient norm (replicated values counted once); clip to ``max_norm`` when given."""
        if self.flat_optimizer:
            grads = self.optimizer.shard_grads()
            sq = grad_norm.weighted_sq_sum(grads, self._norm_weight_shards[: len(grads)])
            groups = [self.dp_group if self.zero1 else None, self.tp_group, self.pp_group]
        else:
            params = [p for p in self.trainable_module.parameters() if p.grad is not None]
            grads = [local_tensor(p.grad) for p in params]
            sq = grad_norm.weighted_sq_sum(grads, [self.norm_weight[id(p)] for p in params])
            groups = [self.tp_group, self.pp_group]
        total = grad_norm.reduce_norm(sq, groups)
        grad_norm.clip_(grads, total, max_norm)
        return total

    @torch.no_grad()
    def parameter_norm(self) -> float:
        """L2 norm of all parameters, replicated values counted once."""
        params = list(self.trainable_module.parameters())
        if not params:
            return 0.0
        sq = grad_norm.weighted_sq_sum([local_tensor(p) for p in params], [self.norm_weight[id(p)] for p in params])
        return grad_norm.reduce_norm(sq, [self.tp_group, self.pp_group])

    # -- export --------------------------------------------------------------------------------
    @torch.no_grad()
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Unsharded parameters under single-device FQNs, each KV head once (for HF export and tests)."""
        from nxdt.parallel.kv_replication import unreplicate_kv

        kv_ids = {id(p) for p in self.kv_params}
        out = {}
        for name, p in self.trainable_module.named_parameters():
            full = p.full_tensor() if isinstance(p, DTensor) else p.detach()
            if id(p) in kv_ids:
                full = unreplicate_kv(full, self.kv_heads, self.kv_replicas)
            out[name.replace(_WRAPPER_PREFIX, "")] = full.clone()
        return out

    def train(self) -> None:
        """Training mode."""
        self.trainable_module.train()

    def eval(self) -> None:
        """Evaluation mode."""
        self.trainable_module.eval()


def _all_reduce_mean_coalesced(tensors: list[torch.Tensor], group: Any, size: int) -> None:
    """Average ``tensors`` over ``group`` in one flat all-reduce per dtype (few gloo round trips)."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for same in by_dtype.values():
        flat = torch.cat([t.reshape(-1) for t in same])
        dist.all_reduce(flat, group=group)
        flat.div_(size)
        offset = 0
        for t in same:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()
