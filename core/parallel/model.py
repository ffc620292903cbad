"""``ParallelModel``: the trainer's one handle on a parallelized model, whatever the layout."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn


class ParallelModel:
    """Forward, gradient sync, clipping and norms of a model that may be sharded and DP-wrapped."""

    def __init__(self, module: nn.Module, ddp: nn.Module | None = None, dp_group: Any = None):
        self.trainable_module = module
        self.ddp = ddp
        self.dp_group = dp_group

    def __call__(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of ``input_ids``."""
        runner = self.ddp if self.ddp is not None else self.trainable_module
        return runner(input_ids, position_ids)

    def no_sync(self, skip_sync: bool):
        """Suppress the DP gradient all-reduce for accumulation micro-batches."""
        if self.ddp is not None and skip_sync:
            return self.ddp.no_sync()
        return contextlib.nullcontext()

    def auxiliary_loss(self) -> torch.Tensor | None:
        """An extra loss term the model computed in its forward (MoE load balancing), if any."""
        return getattr(self.trainable_module, "aux_loss", None)

    def finalize_gradients(self) -> None:
        """Complete gradient reductions DDP does not do (hook for later parallel styles)."""

    def clip_grad_norm(self, max_norm: float | None) -> float:
        """Global gradient norm (replicated parameters counted once); clip to ``max_norm`` when given."""
        params = [p for p in self.trainable_module.parameters() if p.grad is not None]
        if max_norm is None:
            max_norm = float("inf")
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True))

    @torch.no_grad()
    def parameter_norm(self) -> float:
        """L2 norm of all parameters."""
        norms = [p.detach().float().norm() for p in self.trainable_module.parameters()]
        return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0

    def after_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Work after the update (ZeRO-1 parameter gathers, stochastic rounding) for later styles."""

    def train(self) -> None:
        """Training mode."""
        self.trainable_module.train()

    def eval(self) -> None:
        """Evaluation mode."""
        self.trainable_module.eval()
