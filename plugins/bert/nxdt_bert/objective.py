"""The masked-LM objective (with next-sentence prediction when the model has that head).

The loss is a *sum* over masked tokens and ``count`` the masked tokens of the micro-batch, so the
engine divides by the masked tokens of the whole global batch, whatever the DP/TP/PP split. With
the NSP head, each pair's NSP cross-entropy joins the sum weighted by that pair's masked tokens:
one normaliser then serves both, and the total is the masked-LM mean plus the (masked-token
weighted) NSP mean. Metrics are (sum, count) pairs the trainer turns into global means:
``mlm_loss`` and ``mlm_accuracy`` per masked token, ``nsp_loss`` and ``nsp_accuracy`` per pair.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from nxdt.data.batch import IGNORE_INDEX
from nxdt.errors import NxdtError
from nxdt.recipes.losses import logits_of
from nxdt.specs import LossOutput


def heads(outputs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(masked-LM logits, NSP logits or None) from a model's outputs (a tensor, a tuple, or ``.logits``)."""
    if isinstance(outputs, torch.Tensor):
        return outputs, None
    if isinstance(outputs, (tuple, list)):
        return outputs[0], outputs[1] if len(outputs) > 1 else None
    return logits_of(outputs), getattr(outputs, "next_sentence_logits", None)


@torch.no_grad()
def correct_predictions(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """How many labelled positions have their label as the argmax (first maximum) of ``logits``.

    Under tensor parallelism the logits are a vocabulary-sharded DTensor (loss-parallel): each rank
    finds the maximum of its own slice at the labelled positions only, and two all-reduces of one
    value per position give the global argmax, without gathering the vocabulary.
    """
    from torch.distributed.tensor import DTensor  # on use: importing it costs a second of start-up (sympy)

    mask = labels != IGNORE_INDEX
    target = labels[mask]
    if not isinstance(logits, DTensor):
        return (logits.detach()[mask].argmax(-1) == target).sum()
    mesh = logits.device_mesh
    if mesh.ndim != 1 or logits.placements[0].is_replicate():
        return (logits.detach().full_tensor()[mask].argmax(-1) == target).sum()
    local = logits.detach().to_local()[mask].float()
    # DTensor splits like torch.chunk: every shard but the last holds ceil(vocab / ranks) columns.
    offset = mesh.get_local_rank() * -(-logits.shape[-1] // mesh.size())
    best, index = local.max(-1)
    group = mesh.get_group()
    top = best.clone()
    dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
    first = torch.where(best == top, index + offset, torch.full_like(index, torch.iinfo(torch.int64).max))
    dist.all_reduce(first, op=dist.ReduceOp.MIN, group=group)
    return (first == target).sum()


class MaskedLMObjective:
    """Masked-token cross entropy (+ next-sentence prediction), normalised by masked tokens."""

    def count(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Masked tokens in the micro-batch (labels that are not -100)."""
        return (batch["labels"] != IGNORE_INDEX).sum()

    def __call__(self, outputs: Any, batch: Mapping[str, torch.Tensor]) -> LossOutput:
        """The loss sum over masked tokens (NSP weighted per pair) and the masked-LM / NSP metrics."""
        logits, nsp_logits = heads(outputs)
        labels = batch["labels"]
        mlm = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
        )
        from torch.distributed.tensor import DTensor

        if isinstance(mlm, DTensor):
            # The loss-parallel loss is a replicated DTensor: a plain tensor before the (plain) NSP loss joins it,
            # or backward would hand DTensor gradients to the pooler and classifier.
            mlm = mlm.full_tensor()
        masked = self.count(batch)
        metrics = {"mlm_loss": (mlm.detach(), masked), "mlm_accuracy": (correct_predictions(logits, labels), masked)}
        nsp_labels = batch.get("next_sentence_label")
        if nsp_logits is not None and nsp_labels is None:
            raise NxdtError("the model has a next-sentence head but the data has no sentence pairs (next_sentence_label)")
        if nsp_labels is not None and nsp_logits is None:
            raise NxdtError("the data holds sentence pairs but the model has no next-sentence head (model.bert_binary_head)")
        if nsp_logits is None or nsp_labels is None:
            return LossOutput(mlm, metrics)
        per_row = (labels != IGNORE_INDEX).sum(-1)
        pair_loss = F.cross_entropy(nsp_logits.float(), nsp_labels, reduction="none")
        # Rows without masked tokens (validation padding) carry no labels of either kind.
        real = per_row > 0
        pairs = real.sum()
        metrics["nsp_loss"] = ((pair_loss.detach() * real).sum(), pairs)
        metrics["nsp_accuracy"] = (((nsp_logits.detach().argmax(-1) == nsp_labels) & real).sum(), pairs)
        return LossOutput(mlm + (pair_loss * per_row).sum(), metrics)


def build_masked_lm_objective(run_config: Any = None, model_spec: Any = None) -> MaskedLMObjective:
    """The objective registered as ``masked_lm``."""
    return MaskedLMObjective()
