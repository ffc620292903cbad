"""A run's data: tokenizer, datasets, the resumable sampler, and micro-batches grouped into steps."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from nxdt.data.batch import collate
from nxdt.data.sampler import DistributedBatchSampler
from nxdt.data.tokenizer import load_tokenizer
from nxdt.errors import NxdtError


class RunData:
    """Train/validation data of one rank; the global sample stream does not depend on the DP size."""

    def __init__(self, trainer: Any, tokenizer: Any, train: Dataset, val: Dataset | None, keep_position_ids: bool):
        cfg = trainer.cfg
        self.cfg, self.device = cfg, trainer.world.device
        self.tokenizer, self.train, self.val = tokenizer, train, val
        self.grad_accum = trainer.grad_accum
        self.dp_rank = trainer.mesh["dp"].get_local_rank() if trainer.mesh is not None else 0
        self.dp_size = trainer.parallel.dp
        self.keep_position_ids = keep_position_ids
        self.train_samples = len(train)  # type: ignore[arg-type]

    def _loader(self, dataset: Dataset, sampler: DistributedBatchSampler) -> DataLoader:
        return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=self.cfg.data.num_workers or 0)

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # Unpacked rows have plain 0..n-1 positions; leaving them out keeps the model on its fast causal path.
        if not self.keep_position_ids:
            batch.pop("position_ids", None)
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

    def val_batches(self) -> list[dict[str, torch.Tensor]] | None:
        """This rank's validation micro-batches (``limit_val_batches`` global batches), or None."""
        if self.val is None:
            return None
        data, limit = self.cfg.data, self.cfg.trainer.limit_val_batches
        n = len(self.val)  # type: ignore[arg-type]
        total_batches = n // data.global_batch_size
        if isinstance(limit, float):
            batches = int(total_batches * limit) if limit <= 1.0 else int(limit)
        else:
            batches = min(int(limit), total_batches)
        if batches <= 0:
            return None
        sampler = DistributedBatchSampler(
            batches * data.global_batch_size,
            data.micro_batch_size,
            self.dp_rank,
            self.dp_size,
            data.global_batch_size,
            shuffle=False,
        )
        return [self._to_device(b) for b in self._loader(self.val, sampler)]

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
    """``data.tokenizer.type``, else the tokenizer saved with ``model.hf_checkpoint``, else the embedded one."""
    tok_cfg = cfg.data.tokenizer
    if tok_cfg and tok_cfg.type:
        return str(tok_cfg.type)
    hf_dir = cfg.model.hf_checkpoint
    if hf_dir and any((Path(hf_dir) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return str(hf_dir)
    return "embedded"


def build_data(trainer: Any) -> RunData:
    """Tokenizer and datasets of ``trainer``'s recipe, checked against the model's vocabulary."""
    cfg, run, host = trainer.cfg, trainer.run, trainer.host
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
    alignment = cfg.model_alignment_strategy
    packing = bool(alignment and alignment.sft and alignment.sft.packing) and dataset_name == "sft"
    return RunData(trainer, tokenizer, train, val, keep_position_ids=packing)
