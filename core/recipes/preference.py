"""The ``dpo`` and ``orpo`` recipes for causal LMs: preference data, their objectives and metrics.

A micro-batch of ``n`` pairs holds ``2n`` rows ``c0, r0, c1, r1, ...`` (``nxdt.data.preference``),
so the model sees ordinary ``[rows, seq]`` batches on every layout; each objective counts pairs.
A response's log-probability is the sum of its tokens' log-probabilities (labels != -100); under
tensor parallelism the logits stay vocabulary-sharded and the per-token values come from
loss-parallel cross-entropy. The losses are TRL's (``trl.DPOTrainer._compute_loss`` with
``loss_type`` sigmoid, hinge or ipo; ``trl.experimental.orpo.ORPOTrainer``), summed over pairs,
and the metrics carry TRL's names (``rewards/chosen``, ``rewards/rejected``, ``rewards/margins``,
``rewards/accuracies``, ``logps/chosen``, ``logps/rejected``; ORPO adds ``nll_loss``,
``log_odds_ratio`` and ``log_odds_chosen``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from nxdt.data.batch import IGNORE_INDEX
from nxdt.errors import NxdtError
from nxdt.recipes.losses import logits_of
from nxdt.specs import LossOutput

DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo")


def token_logps(logits: Any, targets: torch.Tensor) -> torch.Tensor:
    """Per-token log-probabilities ``[rows, seq]`` of ``targets`` (0 where -100), as a plain tensor.

    Vocabulary-sharded logits (a DTensor under TP) go through loss-parallel cross-entropy (the
    caller's ``loss_parallel`` context), so the full logits are never gathered.
    """
    flat = logits.reshape(-1, logits.shape[-1])
    # At least fp32 (bf16 logits are upcast; fp64 ones, in tests, stay fp64).
    nll = F.cross_entropy(flat.to(torch.promote_types(flat.dtype, torch.float32)), targets.reshape(-1),
                          ignore_index=IGNORE_INDEX, reduction="none")
    from torch.distributed.tensor import DTensor  # on use: importing it costs a second of start-up (sympy)

    if isinstance(nll, DTensor):
        nll = nll.full_tensor()
    return -nll.view(targets.shape)


def response_logps(outputs: Any, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Each row's response log-probability (the sum over its labelled tokens): ``[rows]``."""
    return token_logps(logits_of(outputs), batch["labels"]).sum(-1)


def valid_pairs(batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``[pairs]`` bool: both responses have labelled tokens (validation padding pairs have none)."""
    return (batch["labels"] != IGNORE_INDEX).any(-1).view(-1, 2).all(-1)


def _metric(values: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum over valid pairs, valid pairs) of per-pair ``values``."""
    return (values.detach().float() * valid).sum(), valid.sum().float()


def _reward_metrics(chosen: torch.Tensor, rejected: torch.Tensor, valid: torch.Tensor) -> dict[str, Any]:
    return {
        "rewards/chosen": _metric(chosen, valid),
        "rewards/rejected": _metric(rejected, valid),
        "rewards/margins": _metric(chosen - rejected, valid),
        "rewards/accuracies": _metric((chosen > rejected).float(), valid),
    }


class PairObjective:
    """Shared by DPO and ORPO: pairs are the normaliser units; the run's data-parallel group."""

    def __init__(self) -> None:
        self.dp_group: Any = None

    def count(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Pairs in the micro-batch (padding pairs without labels do not count)."""
        return valid_pairs(batch).sum()


class DPOObjective(PairObjective):
    """Direct preference optimisation against a reference model's log-probs (``batch["ref_logps"]``)."""

    def __init__(self, beta: float, loss_type: str = "sigmoid", precompute: bool = True):
        super().__init__()
        if loss_type not in DPO_LOSS_TYPES:
            raise NxdtError(f"model_alignment_strategy.dpo.loss_type={loss_type!r}: use one of {', '.join(DPO_LOSS_TYPES)}")
        self.beta, self.loss_type, self.precompute = float(beta), loss_type, bool(precompute)
        self.reference: Any = None  # set by setup(): where the reference log-probs come from

    def setup(self, trainer: Any) -> None:
        """Prepare the reference: precompute its log-probs, build a frozen copy, or use the adapters-disabled policy."""
        from nxdt.recipes.preference_reference import Reference

        self.dp_group = trainer.ctx.group("dp")
        self.reference = Reference.create(trainer, self.precompute)

    def annotate(self, micro_batches: list[dict[str, torch.Tensor]]) -> None:
        """Attach the reference log-probs of every row (``ref_logps``) to each micro-batch."""
        if self.reference is not None:
            self.reference.annotate(micro_batches)
        elif any("ref_logps" not in mb for mb in micro_batches):
            raise NxdtError("DPO: the batch has no reference log-probs (ref_logps); the objective was not set up")

    def __call__(self, outputs: Any, batch: Mapping[str, torch.Tensor]) -> LossOutput:
        """Sum over pairs of TRL's DPO loss; rewards are beta times the policy/reference log-ratios."""
        logps = response_logps(outputs, batch)
        ref = batch["ref_logps"].to(logps.dtype)
        valid = valid_pairs(batch)
        chosen_ratio, rejected_ratio = logps[0::2] - ref[0::2], logps[1::2] - ref[1::2]
        delta = chosen_ratio - rejected_ratio
        if self.loss_type == "sigmoid":
            losses = -F.logsigmoid(self.beta * delta)
        elif self.loss_type == "hinge":
            losses = torch.relu(1 - self.beta * delta)
        else:  # ipo: TRL divides each log-ratio by its response length
            lengths = (batch["labels"] != IGNORE_INDEX).sum(-1).clamp(min=1).to(logps.dtype)
            losses = (chosen_ratio / lengths[0::2] - rejected_ratio / lengths[1::2] - 1 / (2 * self.beta)) ** 2
        metrics = _reward_metrics(self.beta * chosen_ratio, self.beta * rejected_ratio, valid)
        metrics["logps/chosen"] = _metric(logps[0::2], valid)
        metrics["logps/rejected"] = _metric(logps[1::2], valid)
        return LossOutput(torch.where(valid, losses, 0.0).sum(), metrics)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x < 0``, stable on both sides of ``-ln 2``."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def nll_targets(batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Next-token targets of every real token after the first (prompt and response), -100 elsewhere.

    TRL's ORPO takes its NLL term over the whole chosen sequence, prompt included; a row ends at
    its last labelled position (the one predicting the final response token).
    """
    labels, ids = batch["labels"], batch["input_ids"]
    positions = torch.arange(labels.shape[-1], device=labels.device)
    last = torch.where(labels != IGNORE_INDEX, positions, -1).amax(-1, keepdim=True)
    following = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], IGNORE_INDEX)], dim=1)
    return torch.where(positions <= last, following, IGNORE_INDEX)


class ORPOObjective(PairObjective):
    """Odds-ratio preference optimisation (no reference): chosen NLL minus beta times the log odds-ratio's log-sigmoid.

    TRL's NLL is a token mean over the batch's chosen sequences; here it is the token mean over the
    whole global batch, independent of the data-parallel size and accumulation split: ``annotate``
    sums the step's chosen tokens and pairs over DP and hands each row the weight ``pairs / tokens``
    (``nll_weight``), so the pair sum divided by the global pairs is NLL mean + odds-ratio mean
    (on validation, over the whole validation pass).
    """

    def __init__(self, beta: float):
        super().__init__()
        self.beta = float(beta)

    def setup(self, trainer: Any) -> None:
        """Remember the data-parallel group (the NLL weight is a global-batch ratio)."""
        self.dp_group = trainer.ctx.group("dp")

    def annotate(self, micro_batches: list[dict[str, torch.Tensor]]) -> None:
        """Give every row the weight ``global pairs / global chosen NLL tokens`` (``nll_weight``)."""
        totals = torch.zeros(2, device=micro_batches[0]["labels"].device)
        for mb in micro_batches:
            valid = valid_pairs(mb)
            totals[0] += ((nll_targets(mb)[0::2] != IGNORE_INDEX).sum(-1) * valid).sum()
            totals[1] += valid.sum()
        if self.dp_group is not None:
            dist.all_reduce(totals, group=self.dp_group)
        weight = totals[1] / totals[0].clamp(min=1)
        for mb in micro_batches:
            mb["nll_weight"] = weight.expand(mb["labels"].shape[0]).clone()

    def __call__(self, outputs: Any, batch: Mapping[str, torch.Tensor]) -> LossOutput:
        """Sum over pairs of TRL's ORPO loss (its NLL term weighted to the global token mean)."""
        targets = nll_targets(batch)
        per_token = token_logps(logits_of(outputs), targets)
        labelled = batch["labels"] != IGNORE_INDEX
        valid = valid_pairs(batch)
        # Response log-probs averaged over their tokens (TRL's average_log_prob=True).
        avg = (per_token * labelled).sum(-1) / labelled.sum(-1).clamp(min=1)
        chosen, rejected = avg[0::2], avg[1::2]
        log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
        ratio = F.logsigmoid(log_odds)
        chosen_nll = -per_token[0::2].sum(-1)
        chosen_tokens = (targets[0::2] != IGNORE_INDEX).sum(-1)
        if "nll_weight" in batch:
            weight = batch["nll_weight"][0::2].to(chosen_nll.dtype)
        else:  # not annotated: this micro-batch's own token mean
            weight = valid.sum() / (chosen_tokens * valid).sum().clamp(min=1)
        losses = weight * chosen_nll - self.beta * ratio
        metrics = _reward_metrics(self.beta * chosen, self.beta * rejected, valid)
        metrics["logps/chosen"] = _metric(chosen, valid)
        metrics["logps/rejected"] = _metric(rejected, valid)
        metrics["nll_loss"] = ((chosen_nll.detach() * valid).sum(), (chosen_tokens * valid).sum().float())
        metrics["log_odds_ratio"] = _metric(ratio, valid)
        metrics["log_odds_chosen"] = _metric(log_odds, valid)
        return LossOutput(torch.where(valid, losses, 0.0).sum(), metrics)


def _section(run_config: Any, name: str) -> Any:
    """``model_alignment_strategy.<name>`` (dpo or orpo), or its defaults when the section is absent."""
    from nxdt.config.schema import DpoSection, OrpoSection

    alignment = run_config.model_alignment_strategy
    section = getattr(alignment, name, None) if alignment is not None else None
    return section if section is not None else {"dpo": DpoSection, "orpo": OrpoSection}[name]()


def build_dpo_loss(run_config: Any, model_spec: Any = None) -> DPOObjective:
    """The ``dpo`` objective from ``model_alignment_strategy.dpo`` (kl_beta, loss_type, precompute_ref_log_probs)."""
    dpo = _section(run_config, "dpo")
    return DPOObjective(dpo.kl_beta, dpo.loss_type, dpo.precompute_ref_log_probs)


def build_orpo_loss(run_config: Any, model_spec: Any = None) -> ORPOObjective:
    """The ``orpo`` objective from ``model_alignment_strategy.orpo`` (beta)."""
    return ORPOObjective(_section(run_config, "orpo").beta)


def build_preference_dataset(run_config: Any, tokenizer: Any, split: str) -> Any:
    """Preference pairs of ``data.train_dir`` / ``val_dir``, else the embedded ones; truncation from the dpo/orpo section."""
    from nxdt.data.preference import PreferenceDataset

    data, alignment = run_config.data, run_config.model_alignment_strategy
    section = None
    if alignment is not None:
        section = alignment.dpo if alignment.dpo is not None else alignment.orpo
    source = data.train_dir if split == "train" else data.val_dir
    if source is None and data.train_dir is None:
        from nxdt.data.embedded import embedded_paths

        source = str(embedded_paths()["preference_train" if split == "train" else "preference_validation"])
    if source is None:
        return None
    ds = run_config.distributed_strategy
    # Pipeline stages fix their activation shapes, so pipelined runs pad every pair to seq_length;
    # otherwise to the longest pair, in multiples of 8 and of the TP size (sequence parallelism splits it).
    multiple = None if ds.pipeline_model_parallel_size > 1 else math.lcm(8, ds.tensor_model_parallel_size)
    return PreferenceDataset(
        source,
        tokenizer,
        data.seq_length,
        max_prompt_length=getattr(section, "max_prompt_length", None),
        truncation_mode=getattr(section, "truncation_mode", "keep_start"),
        split="train" if split == "train" else "validation",
        dev_choose_samples=data.dev_choose_samples if split == "train" else None,
        pad_multiple=multiple,
    )
