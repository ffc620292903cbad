"""Pretraining datasets: tokenized Hugging Face datasets on disk, and raw text packed into blocks.

Tokenized datasets (``datasets.save_to_disk``) hold an ``input_ids`` column and optionally
``labels``. NxDT's own data preparation (its Llama ``get_dataset.py``) writes rows of exactly
``seq_length`` tokens with ``labels`` a copy of ``input_ids``, leaving the shift to the model, as
in Hugging Face; Megatron-style tools write ``seq_length + 1`` tokens so that every position has a
target. Both are read: a ``labels`` column is taken as aligned with ``input_ids`` (unshifted, -100
ignored) and shifted here; rows of ``seq_length`` tokens therefore have no target at their last
position, rows of ``seq_length + 1`` use their extra token as the last target.

Raw text is tokenized once, in file order, into one stream with EOS after every document, and cut
into samples of ``seq_length + 1`` tokens, consecutive samples sharing one token (sample ``i`` is
``stream[i * seq_length : i * seq_length + seq_length + 1]``) so that no token goes untrained as
a target. Position ids run 0..seq_length-1 across document boundaries (no reset), as Megatron
does by default.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from nxdt.data.bad_rows import BadRowReport
from nxdt.data.batch import causal_item, shift_labels
from nxdt.data.records import TEXT_SUFFIXES, expand_paths, iter_text_documents, load_saved_split
from nxdt.data.tokenizer import Tokenizer
from nxdt.errors import NxdtError

#: Documents tokenized per call into the tokenizer (fast tokenizers parallelise within a call).
TOKENIZE_BATCH = 1024


class HFPretrainDataset(Dataset):
    """A tokenized ``datasets.save_to_disk`` directory (see the module docstring for row lengths)."""

    def __init__(
        self, path: str | Path, seq_length: int, split: str = "train", max_bad_fraction: float = 0.5
    ) -> None:
        import pyarrow.compute as pc

        path = Path(path).expanduser()
        if not path.exists():
            raise NxdtError(f"dataset directory not found: {path}")
        loaded = load_saved_split(path, split)
        if "input_ids" not in loaded.column_names:
            raise NxdtError(f"{path}: no column 'input_ids' (columns: {loaded.column_names})")
        self.path, self.seq_length = path, seq_length
        self.has_labels = "labels" in loaded.column_names
        columns = ["input_ids", "labels"] if self.has_labels else ["input_ids"]
        if getattr(loaded, "_indices", None) is not None:  # a select()/shuffle() view: make rows physical
            loaded = loaded.flatten_indices()
        self.table = loaded.with_format("numpy", columns=columns)

        # Lengths straight from Arrow: checking every row costs no Python loop over the data.
        lengths = pc.list_value_length(self.table.data.column("input_ids")).to_numpy(zero_copy_only=False)
        good = (lengths == seq_length) | (lengths == seq_length + 1)
        if self.has_labels:
            label_lengths = pc.list_value_length(self.table.data.column("labels")).to_numpy(
                zero_copy_only=False
            )
            mismatched = good & (label_lengths != lengths)
        else:
            label_lengths, mismatched = lengths, np.zeros_like(good)
        self.bad_rows = BadRowReport(max_bad_fraction)
        self.bad_rows.count_read(str(path), len(lengths))
        for row in np.flatnonzero(~good | mismatched):
            if not good[row]:
                detail = f"{lengths[row]} tokens, expected seq_length {seq_length} or {seq_length + 1}"
                self.bad_rows.add(str(path), int(row) + 1, "wrong length", detail, unit="row")
            else:
                detail = f"{label_lengths[row]} labels for {lengths[row]} input_ids"
                self.bad_rows.add(str(path), int(row) + 1, "labels length differs", detail, unit="row")
        self.bad_rows.check()
        self.bad_rows.log()
        self.rows = np.flatnonzero(good & ~mismatched)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        row = self.table[int(self.rows[index])]
        tokens = np.asarray(row["input_ids"], dtype=np.int64)
        if not self.has_labels and len(tokens) == self.seq_length + 1:
            return causal_item(tokens, self.seq_length)
        labels = shift_labels(row["labels"] if self.has_labels else tokens)
        return {
            "input_ids": torch.as_tensor(tokens[: self.seq_length]),
            "labels": labels[: self.seq_length],
            "position_ids": torch.arange(self.seq_length, dtype=torch.long),
        }


def iter_tokenized_documents(
    files: Iterable[Path],
    tokenizer: Tokenizer,
    report: BadRowReport,
    text_key: str = "text",
    append_eos: bool = True,
) -> Iterator[list[int]]:
    """Token ids of every document of ``files`` in order, EOS appended when asked."""
    suffix = [tokenizer.eos_id] if append_eos else []
    pending: list[str] = []

    def flush() -> Iterator[list[int]]:
        for ids in tokenizer.encode_batch(pending):
            yield ids + suffix
        pending.clear()

    for text in iter_text_documents(files, report, text_key=text_key):
        pending.append(text)
        if len(pending) >= TOKENIZE_BATCH:
            yield from flush()
    yield from flush()


class PackedTextDataset(Dataset):
    """Raw text files tokenized into one EOS-separated stream and cut into causal samples."""

    def __init__(
        self,
        inputs: str | Path | Iterable[str | Path],
        tokenizer: Tokenizer,
        seq_length: int,
        text_key: str = "text",
        max_bad_fraction: float = 0.5,
    ) -> None:
        self.files = expand_paths(inputs, TEXT_SUFFIXES)
        self.seq_length = seq_length
        self.bad_rows = BadRowReport(max_bad_fraction)
        dtype = np.int32 if tokenizer.vocab_size < 2**31 else np.int64
        pieces = [
            np.asarray(ids, dtype=dtype)
            for ids in iter_tokenized_documents(self.files, tokenizer, self.bad_rows, text_key=text_key)
        ]
        self.bad_rows.check()
        self.bad_rows.log()
        self.num_documents = len(pieces)
        self.tokens = np.concatenate(pieces) if pieces else np.zeros(0, dtype=dtype)
        if len(self.tokens) < seq_length + 1:
            names = ", ".join(str(f) for f in self.files)
            raise NxdtError(
                f"{names}: {len(self.tokens)} tokens in all, fewer than seq_length + 1 = {seq_length + 1}"
            )

    def __len__(self) -> int:
        return (len(self.tokens) - 1) // self.seq_length

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        start = index * self.seq_length
        return causal_item(self.tokens[start : start + self.seq_length + 1], self.seq_length)
