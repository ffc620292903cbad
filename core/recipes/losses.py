"""Objectives: a loss *sum* over a micro-batch's units, its normaliser, and metrics.

Returning a sum and counting units before the forward lets the engine normalise by the units of
the whole global batch, so the loss and gradients do not depend on the data-parallel size or the
accumulation split. Plugin API 1 losses (``loss(logits, batch) -> (sum, tokens)``) are wrapped.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F

from nxdt.specs import LossOutput

IGNORE_INDEX = -100


def logits_of(outputs: Any) -> torch.Tensor:
    """The logits in a model's outputs: the tensor itself, ``outputs.logits`` or ``outputs["logits"]``."""
    if isinstance(outputs, torch.Tensor):
        return outputs
    if isinstance(outputs, Mapping):
        return outputs["logits"]
    return outputs.logits


def causal_lm_loss(logits: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross entropy of already-shifted ``labels`` (-100 ignored), summed, and the token count."""
    labels = batch["labels"]
    loss_sum = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return loss_sum, (labels != IGNORE_INDEX).sum()


def label_count(batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Tokens that carry a label (not -100): the normaliser of token-level losses."""
    return (batch["labels"] != IGNORE_INDEX).sum()


class TokenObjective:
    """A token-level objective from a ``loss(logits, batch) -> (sum, tokens)`` function."""

    def __init__(self, loss: Callable[[Any, Mapping[str, torch.Tensor]], Any]):
        self.loss = loss

    def count(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Labelled tokens in the micro-batch."""
        return label_count(batch)

    def __call__(self, outputs: Any, batch: Mapping[str, torch.Tensor]) -> LossOutput:
        """The token loss sum (metrics: none)."""
        result = self.loss(logits_of(outputs), batch)
        if isinstance(result, LossOutput):
            return result
        return LossOutput(result[0])


def as_objective(built: Any) -> Any:
    """An objective from what a LossSpec's ``build`` returned (API 2 objective, or an API 1 loss function)."""
    if hasattr(built, "count") and callable(built):
        return built
    return TokenObjective(built)


def build_causal_lm_loss(run_config: Any = None, model_spec: Any = None) -> TokenObjective:
    """The causal-LM objective registered as ``causal_lm``: next-token cross entropy per labelled token."""
    return TokenObjective(causal_lm_loss)
