"""Token-level losses. Each returns (sum of per-token losses, number of counted tokens) so that
gradient accumulation and data parallelism can normalise by the tokens of the whole global batch."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def causal_lm_loss(logits: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross entropy of already-shifted ``labels`` (-100 ignored), summed, and the token count."""
    labels = batch["labels"]
    loss_sum = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return loss_sum, (labels != IGNORE_INDEX).sum()


def build_causal_lm_loss(run_config: Any = None, model_spec: Any = None):
    """The causal-LM loss builder registered as ``causal_lm``."""
    return causal_lm_loss
