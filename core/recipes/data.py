"""A run's data: tokenizer, datasets, the resumable sampler, and micro-batches grouped into steps.

What reaches the model follows the model contract, not a dataset's name: a batch keeps
``position_ids`` only where they say something (packed documents, reset positions) and the model
declares them as an input; plain ``0..n-1`` positions are dropped so the model takes its fused
causal path.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import DataLoader, Dataset

from nxdt.data.batch import IGNORE_INDEX, collate
from nxdt.data.sampler import DistributedBatchSampler
from nxdt.data.tokenizer import load_tokenizer
from nxdt.errors import ConfigError, NxdtError

if TYPE_CHECKING:
    from nxdt.run_context import RunContext


def plain_positions(position_ids: torch.Tensor) -> bool:
    """Whether every row of ``position_ids`` is just ``0..n-1`` (no packed documents, no resets)."""
    return torch.equal(position_ids, torch.arange(position_ids.shape[-1]).expand_as(position_ids))


class RunData:
    """Train/validation data of one rank; the global sample stream does not depend on the DP size."""

    def __init__(self, ctx: RunContext, tokenizer: Any, train: Dataset, val: Dataset | None):
        self.cfg, self.device = ctx.cfg, ctx.world.device
        self.tokenizer, self.train, self.val = tokenizer, train, val
        self.grad_accum = ctx.grad_accum
        self.dp_rank = ctx.dp_rank
        self.dp_size = ctx.parallel.dp
        self.inputs = set(ctx.spec.inputs)
        self.family = ctx.run.family
        self.train_samples = len(train)  # type: ignore[arg-type]

    def _loader(self, dataset: Dataset, batch_sampler: Any) -> DataLoader:
        return DataLoader(dataset, batch_sampler=batch_sampler, collate_fn=collate, num_workers=self.cfg.data.num_workers or 0)

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        positions = batch.get("position_ids")
        if positions is not None and plain_positions(positions):
            del batch["position_ids"]  # the model's default positions; keeps its fused causal kernel
        elif positions is not None and "position_ids" not in self.inputs:
            raise NxdtError(
                f"the batch holds packed documents (restarting position_ids) but the {self.family} family does not "
                "take position_ids, so it cannot keep them apart; set model_alignment_strategy.sft.packing=false"
            )
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def train_steps(self, consumed_samples: int) -> Iterator[list[dict[str, torch.Tensor]]]:
        """Endless iterator of steps (``grad_accum`` micro-batches each) from ``consumed_samples`` on."""
        data = self.cfg.data
        sampler = DistributedBatchSampler(
            self.train_samples,
            data.micro_batch_size,
            self.dp_rank,
            self.dp_size,
            data.global_batch_size,
            seed=data.seed if data.seed is not None else self.cfg.seed,
            consumed_samples=consumed_samples,
        )
        step: list[dict[str, torch.Tensor]] = []
        while True:  # each pass over the loader is the rest of one epoch
            for batch in self._loader(self.train, sampler):
                step.append(self._to_device(batch))
                if len(step) == self.grad_accum:
                    yield step
                    step = []

    def val_global_batches(self, limit: int | float | None = None) -> int:
        """How many validation global batches ``limit`` (else ``trainer.limit_val_batches``) selects."""
        assert self.val is not None
        data = self.cfg.data
        limit = self.cfg.trainer.limit_val_batches if limit is None else limit
        n = len(self.val)  # type: ignore[arg-type]
        available = n // data.global_batch_size
        padded = not data.validation_drop_last or data.pad_samples_to_global_batch_size
        if padded and n % data.global_batch_size:
            available += 1  # the last, partial batch is padded with rows that carry no labels
        if isinstance(limit, float):
            return int(available * limit) if limit <= 1.0 else min(int(limit), available)
        return min(int(limit), available)

    def val_batches(self, limit: int | float | None = None) -> list[dict[str, torch.Tensor]] | None:
        """This rank's validation micro-batches, in order; None without a validation set or batches."""
        if self.val is None:
            return None
        batches = self.val_global_batches(limit)
        if batches <= 0:
            return None
        data = self.cfg.data
        gbs, mbs = data.global_batch_size, data.micro_batch_size
        n = len(self.val)  # type: ignore[arg-type]
        share = gbs // self.dp_size
        out = []
        for g in range(batches):
            mine = range(g * gbs + self.dp_rank * share, g * gbs + (self.dp_rank + 1) * share)
            for first in range(0, share, mbs):
                rows = [self._val_item(i, n) for i in mine[first : first + mbs]]
                out.append(self._to_device(collate(rows)))
        return out

    def _val_item(self, index: int, n: int) -> dict[str, torch.Tensor]:
        assert self.val is not None
        if index < n:
            return self.val[index]
        # Padding of a partial last batch: a real row whose labels are all ignored counts for nothing.
        item = {k: v.clone() for k, v in self.val[0].items()}
        item["labels"].fill_(IGNORE_INDEX)
        return item

    def report(self) -> list[str]:
        """Lines describing the data for the start-of-run banner."""
        lines = [f"data: {self.train_samples} training samples of {self.cfg.data.seq_length} tokens"
                 + (f", {len(self.val)} validation samples" if self.val is not None else "")]  # type: ignore[arg-type]
        for ds in (self.train, self.val):
            report = getattr(getattr(ds, "dataset", ds), "bad_rows", None)
            if report is not None and report.count:
                lines.append(f"data: {report.summary()}")
        return lines


def tokenizer_source(cfg: Any) -> str:
    """``data.tokenizer.type``, its sentencepiece ``model``, the tokenizer of ``model.hf_checkpoint``, else the embedded one."""
    tok_cfg = cfg.data.tokenizer
    if tok_cfg and tok_cfg.type and not (tok_cfg.library == "sentencepiece" and tok_cfg.model):
        return str(tok_cfg.type)
    if tok_cfg and tok_cfg.model:
        return str(tok_cfg.model)  # a sentencepiece .model file (library: sentencepiece)
    if tok_cfg and tok_cfg.library == "sentencepiece":
        raise ConfigError("data.tokenizer.library=sentencepiece needs data.tokenizer.model (the .model file)")
    hf_dir = cfg.model.hf_checkpoint
    if hf_dir and any((Path(hf_dir) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return str(hf_dir)
    return "embedded"


def build_data(ctx: RunContext) -> RunData:
    """Tokenizer and datasets of the run's recipe, checked against the model's vocabulary."""
    cfg, run, host = ctx.cfg, ctx.run, ctx.host
    tok_cfg = cfg.data.tokenizer
    extra = {k: getattr(tok_cfg, k, None) for k in ("vocab_file", "merge_file")}
    tokenizer = load_tokenizer(tokenizer_source(cfg), **{k: v for k, v in extra.items() if v})
    vocab = getattr(run.arch, "vocab_size", None)
    if vocab is not None and tokenizer.vocab_size > vocab:
        raise NxdtError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size is {vocab}; "
            f"set model.vocab_size={tokenizer.vocab_size} or use a matching tokenizer"
        )
    dataset_name = run.recipe.dataset if run.recipe else "pretrain"
    builder = host.dataset(dataset_name).build
    train = builder(cfg, tokenizer, "train")
    if train is None:
        raise NxdtError(f"recipe dataset {dataset_name!r} found no training data; set data.train_dir")
    val = builder(cfg, tokenizer, "validation")
    data = RunData(ctx, tokenizer, train, val)
    if val is not None and data.val_global_batches(1.0) == 0 and cfg.trainer.limit_val_batches:
        raise ConfigError(
            f"data.val_dir: the validation set has {len(val)} samples, fewer than one global batch "  # type: ignore[arg-type]
            f"({cfg.data.global_batch_size}); set data.validation_drop_last=false to validate on a partial batch"
        )
    return data
