"""Megatron indexed datasets (.bin/.idx): writing, memory-mapped reading, and causal samples.

The layout is Megatron-LM's ``MMapIndexedDataset``, so files written by Megatron's
``preprocess_data.py`` are read here and the other way round. All integers are little-endian:

``prefix.idx``::

    9 bytes   magic b"MMIDIDX\\x00\\x00"
    uint64    version (1)
    uint8     dtype code of the tokens (see DTYPE_CODES)
    uint64    N, the number of sequences
    uint64    D, the number of entries of doc_idx (documents + 1)
    int32[N]  sizes: tokens per sequence
    int64[N]  pointers: byte offset of each sequence in prefix.bin
    int64[D]  doc_idx: index of the first sequence of each document, then N

``prefix.bin``: the tokens of all sequences, back to back, in the dtype of the header.

nxdt writes one sequence per document (Megatron's default without sentence splitting), so
sequences and documents coincide and samples are cut across sequences.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from nxdt.data.bad_rows import BadRowReport
from nxdt.data.batch import causal_item
from nxdt.data.blend import BlendedDataset
from nxdt.data.tokenizer import Tokenizer
from nxdt.errors import NxdtError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
DTYPE_CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 8: np.uint16}
_HEADER = struct.Struct("<9sQBQQ")


def dtype_code(dtype: Any) -> int:
    """The header code of an integer token dtype."""
    dtype = np.dtype(dtype)
    for code, candidate in DTYPE_CODES.items():
        if np.dtype(candidate) == dtype:
            return code
    raise NxdtError(
        f"unsupported token dtype {dtype}; one of {[np.dtype(d).name for d in DTYPE_CODES.values()]}"
    )


def best_token_dtype(vocab_size: int) -> type[np.integer]:
    """The smallest dtype holding every token id (uint16 below 65 500, as Megatron chooses)."""
    return np.uint16 if vocab_size < 65500 else np.int32


class IndexedDatasetWriter:
    """Streams documents into ``prefix.bin`` and writes ``prefix.idx`` on ``close()``."""

    def __init__(self, out_prefix: str | Path, dtype: Any = np.int32) -> None:
        self.prefix = Path(out_prefix)
        self.prefix.parent.mkdir(parents=True, exist_ok=True)
        self.dtype = np.dtype(dtype)
        self.code = dtype_code(self.dtype)
        self.limits = np.iinfo(self.dtype)
        self.sizes: list[int] = []
        self.bin = open(self.prefix.with_name(self.prefix.name + ".bin"), "wb")

    def add_document(self, tokens: Sequence[int] | np.ndarray) -> None:
        """Append one document as one sequence."""
        array = np.asarray(tokens)
        if array.size and (array.min() < self.limits.min or array.max() > self.limits.max):
            raise NxdtError(f"token ids {array.min()}..{array.max()} do not fit dtype {self.dtype}")
        self.bin.write(array.astype(self.dtype, copy=False).tobytes(order="C"))
        self.sizes.append(int(array.size))

    def close(self) -> None:
        """Finish the .bin file and write the .idx file."""
        self.bin.close()
        sizes = np.asarray(self.sizes, dtype=np.int32)
        pointers = np.zeros(len(sizes), dtype=np.int64)
        np.cumsum(sizes[:-1].astype(np.int64) * self.dtype.itemsize, out=pointers[1:])
        doc_idx = np.arange(len(sizes) + 1, dtype=np.int64)
        with open(self.prefix.with_name(self.prefix.name + ".idx"), "wb") as idx:
            idx.write(_HEADER.pack(MAGIC, VERSION, self.code, len(sizes), len(doc_idx)))
            idx.write(sizes.tobytes())
            idx.write(pointers.tobytes())
            idx.write(doc_idx.tobytes())

    def __enter__(self) -> IndexedDatasetWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def write_indexed_dataset(
    out_prefix: str | Path, token_lists: Iterable[Sequence[int]], dtype: Any = np.int32
) -> tuple[Path, Path]:
    """Write ``token_lists`` (one document each) as ``out_prefix.bin``/``.idx``; return both paths."""
    with IndexedDatasetWriter(out_prefix, dtype) as writer:
        for tokens in token_lists:
            writer.add_document(tokens)
    prefix = Path(out_prefix)
    return prefix.with_name(prefix.name + ".bin"), prefix.with_name(prefix.name + ".idx")


class IndexedDataset:
    """Memory-mapped reader of ``prefix.bin``/``.idx``; item ``i`` is sequence ``i`` as numpy."""

    def __init__(self, prefix: str | Path) -> None:
        self.prefix = Path(prefix).expanduser()
        idx_path = self.prefix.with_name(self.prefix.name + ".idx")
        bin_path = self.prefix.with_name(self.prefix.name + ".bin")
        for path in (idx_path, bin_path):
            if not path.is_file():
                raise NxdtError(f"Megatron indexed dataset file not found: {path}")
        index = np.memmap(idx_path, dtype=np.uint8, mode="r")
        if len(index) < _HEADER.size:
            raise NxdtError(f"{idx_path}: too short to be a Megatron index")
        magic, version, code, count, doc_count = _HEADER.unpack(bytes(index[: _HEADER.size]))
        if magic != MAGIC:
            raise NxdtError(f"{idx_path}: not a Megatron MMIDIDX index (magic {magic!r})")
        if version != VERSION or code not in DTYPE_CODES:
            raise NxdtError(f"{idx_path}: unsupported index version {version} or dtype code {code}")
        self.dtype = np.dtype(DTYPE_CODES[code])
        offset = _HEADER.size
        self.sizes = np.frombuffer(index, dtype=np.int32, count=count, offset=offset)
        offset += self.sizes.nbytes
        self.pointers = np.frombuffer(index, dtype=np.int64, count=count, offset=offset)
        offset += self.pointers.nbytes
        self.doc_idx = np.frombuffer(index, dtype=np.int64, count=doc_count, offset=offset)
        # An empty .bin cannot be memory-mapped; it can only hold empty sequences anyway.
        self.tokens = (
            np.memmap(bin_path, dtype=self.dtype, mode="r")
            if bin_path.stat().st_size
            else np.zeros(0, dtype=self.dtype)
        )

    def __getstate__(self) -> dict[str, Any]:
        # Pickling (DataLoader workers started by spawn) reopens the files instead of copying them.
        return {"prefix": self.prefix}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["prefix"])  # type: ignore[misc]

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, index: int) -> np.ndarray:
        return self.get(index)

    def get(self, index: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens ``offset:offset+length`` of sequence ``index`` (a view into the memory map)."""
        start = int(self.pointers[index]) // self.dtype.itemsize + offset
        length = int(self.sizes[index]) - offset if length is None else length
        return self.tokens[start : start + length]

    @property
    def num_tokens(self) -> int:
        """Tokens over all sequences."""
        return int(self.sizes.sum(dtype=np.int64))


class GPTDataset(Dataset):
    """Causal samples of ``seq_length + 1`` tokens cut across the documents of an indexed dataset.

    Documents are concatenated in a seeded order, reshuffled per epoch, for as many epochs as
    ``num_samples`` needs (one epoch when it is None); consecutive samples share one token, and
    the sample order is shuffled with the same seed.
    """

    def __init__(
        self,
        indexed: IndexedDataset,
        seq_length: int,
        num_samples: int | None = None,
        seed: int = 1234,
        shuffle: bool = True,
    ) -> None:
        self.indexed, self.seq_length = indexed, seq_length
        tokens_per_epoch = indexed.num_tokens
        one_epoch = (tokens_per_epoch - 1) // seq_length
        if one_epoch < 1:
            raise NxdtError(
                f"{indexed.prefix}: {tokens_per_epoch} tokens, fewer than seq_length + 1 = {seq_length + 1}"
            )
        self.num_samples = one_epoch if num_samples is None else num_samples
        epochs = max(1, math.ceil((self.num_samples * seq_length + 1) / tokens_per_epoch))
        documents = np.arange(len(indexed), dtype=np.int64)
        orders = [
            np.random.default_rng([seed, epoch]).permutation(documents) if shuffle else documents
            for epoch in range(epochs)
        ]
        self.document_order = np.concatenate(orders)
        self.document_ends = np.cumsum(indexed.sizes[self.document_order].astype(np.int64))
        self.sample_order = (
            np.random.default_rng([seed, epochs, 1]).permutation(self.num_samples)
            if shuffle
            else np.arange(self.num_samples)
        )

    def __len__(self) -> int:
        return self.num_samples

    def sample_tokens(self, index: int) -> np.ndarray:
        """The ``seq_length + 1`` tokens of sample ``index``."""
        start = int(self.sample_order[index]) * self.seq_length
        position = int(np.searchsorted(self.document_ends, start, side="right"))
        document = int(self.document_order[position])
        offset = start - (int(self.document_ends[position]) - int(self.indexed.sizes[document]))
        pieces, needed = [], self.seq_length + 1
        while needed > 0:
            document = int(self.document_order[position])
            piece = self.indexed.get(
                document, offset, min(needed, int(self.indexed.sizes[document]) - offset)
            )
            pieces.append(piece)
            needed -= len(piece)
            position, offset = position + 1, 0
        return np.concatenate(pieces).astype(np.int64)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < self.num_samples:
            raise IndexError(index)
        return causal_item(self.sample_tokens(index), self.seq_length)


def parse_data_prefix(data_prefix: str | Path | Sequence[Any]) -> list[tuple[float, str]]:
    """(weight, prefix) pairs from ``prefix``, ``[prefix]`` or ``[w1, prefix1, w2, prefix2, ...]``."""
    if isinstance(data_prefix, (str, Path)):
        return [(1.0, str(data_prefix))]
    items = list(data_prefix)
    if len(items) == 1:
        return [(1.0, str(items[0]))]
    if len(items) % 2:
        raise NxdtError(
            f"data_prefix must be [prefix] or [weight1, prefix1, weight2, prefix2, ...], got {items}"
        )
    pairs = []
    for weight, prefix in zip(items[::2], items[1::2], strict=True):
        try:
            pairs.append((float(weight), str(prefix)))
        except (TypeError, ValueError):
            raise NxdtError(f"data_prefix weight {weight!r} (for {prefix!r}) is not a number") from None
    return pairs


def build_megatron_dataset(
    data_prefix: str | Path | Sequence[Any],
    seq_length: int,
    num_samples: int | None = None,
    seed: int = 1234,
    shuffle: bool = True,
) -> Dataset:
    """A GPTDataset for one prefix, or a BlendedDataset of several weighted ones.

    A blend without ``num_samples`` has as many samples as one epoch of all its datasets.
    """
    pairs = parse_data_prefix(data_prefix)
    if len(pairs) == 1:
        return GPTDataset(IndexedDataset(pairs[0][1]), seq_length, num_samples, seed, shuffle)
    indexed = [IndexedDataset(prefix) for _, prefix in pairs]
    total = sum(w for w, _ in pairs)
    if num_samples is None:
        num_samples = sum((d.num_tokens - 1) // seq_length for d in indexed)
    # A little headroom, as Megatron takes, so rounding in the interleave never wraps a dataset.
    parts = [
        GPTDataset(d, seq_length, max(1, math.ceil(w / total * num_samples * 1.005) + 1), seed, shuffle)
        for (w, _), d in zip(pairs, indexed, strict=True)
    ]
    return BlendedDataset([w for w, _ in pairs], parts, num_samples, seed)


def preprocess_to_megatron(
    inputs: str | Path | Iterable[str | Path],
    tokenizer: Tokenizer,
    out_prefix: str | Path,
    text_key: str = "text",
    append_eos: bool = True,
    max_bad_fraction: float = 0.5,
) -> dict[str, Any]:
    """Tokenize text files (.txt/.jsonl/.parquet or directories) into ``out_prefix.bin``/``.idx``."""
    from nxdt.data.pretrain import iter_tokenized_documents
    from nxdt.data.records import TEXT_SUFFIXES, expand_paths

    files = expand_paths(inputs, TEXT_SUFFIXES)
    report = BadRowReport(max_bad_fraction)
    dtype = best_token_dtype(tokenizer.vocab_size)
    documents = tokens = 0
    with IndexedDatasetWriter(out_prefix, dtype) as writer:
        for ids in iter_tokenized_documents(
            files, tokenizer, report, text_key=text_key, append_eos=append_eos
        ):
            writer.add_document(ids)
            documents += 1
            tokens += len(ids)
    report.check()
    report.log()
    prefix = Path(out_prefix)
    return {
        "files": [str(f) for f in files],
        "documents": documents,
        "tokens": tokens,
        "dtype": np.dtype(dtype).name,
        "bad_rows": report.count,
        "bad_rows_summary": report.summary(),
        "bin_path": str(prefix.with_name(prefix.name + ".bin")),
        "idx_path": str(prefix.with_name(prefix.name + ".idx")),
    }
