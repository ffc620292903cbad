"""Masked-LM pre-training data: the engine's corpora cut into BERT samples, masked deterministically.

Sources are the ones the causal ``pretrain`` recipe reads, through the engine's readers: raw text
(``.txt`` paragraphs, ``.jsonl``/``.parquet`` ``text`` fields, or directories of them), a
``datasets.save_to_disk`` directory (tokenized ``input_ids`` or a ``text`` column), and Megatron
``.bin``/``.idx`` prefixes (weighted blends included); without any, nxdt's embedded corpus.

Each document becomes sentences of token ids (raw text is split after ``.``/``!``/``?`` and at line
breaks; tokenized sources at their [SEP]/EOS tokens), and consecutive sentences of one document
are grouped into *spans* that fill a sample. A sample is ``[CLS] A [SEP]`` (or, for next-sentence
prediction, ``[CLS] A [SEP] B [SEP]`` where B is the span's continuation or, half of the time, text
from another document), padded to ``data.seq_length`` with ``token_type_ids`` and an
``attention_mask``. Then 15% of its tokens (rounded, at least one; never [CLS], [SEP] or padding)
are chosen for prediction: 80% become [MASK], 10% a random token, 10% stay; ``labels`` hold their
original ids and -100 elsewhere.

Every random choice of sample ``i`` comes from a generator seeded by ``(seed, i)``, so a sample is
the same whichever rank, layout or epoch reads it: a global batch is masked identically under any
DP/TP/PP split. The training set holds ``TRAIN_COPIES`` differently masked copies of each span
(Google BERT's ``dupe_factor``), so an epoch is that many passes over the text.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from nxdt.data.batch import IGNORE_INDEX
from nxdt.data.records import load_saved_split
from nxdt.errors import ConfigError, NxdtError

MASK_PROB = 0.15
MASK_TOKEN_PROB, RANDOM_TOKEN_PROB = 0.8, 0.1  # the rest of the chosen tokens stay as they are
RANDOM_NEXT_PROB = 0.5
#: differently masked copies of each training span (Google BERT's dupe_factor)
TRAIN_COPIES = 10
#: sentences end after . ! ? followed by white space, and at line breaks
SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\s*\n\s*")
TOKENIZE_BATCH = 4096


@dataclass(frozen=True)
class SpecialTokens:
    """The ids a BERT sample is built from, read from the tokenizer (never assumed)."""

    cls: int
    sep: int
    mask: int
    pad: int
    #: ids never drawn as random replacements nor kept inside sentences
    special: frozenset[int]

    @classmethod
    def of(cls, tokenizer: Any) -> SpecialTokens:
        """The tokenizer's [CLS], [SEP], [MASK] and [PAD]; a one-line error naming what it lacks."""
        ids = {name: getattr(tokenizer, f"{name}_id", None) for name in ("cls", "sep", "mask", "pad")}
        missing = [f"[{name.upper()}]" for name, value in ids.items() if value is None]
        if missing:
            from nxdt_bert.plugin import tokenizer_path

            raise NxdtError(
                f"masked-LM pre-training needs a tokenizer with [CLS], [SEP], [MASK] and [PAD] tokens; "
                f"{getattr(tokenizer, 'name', '') or tokenizer!r} has no {', '.join(missing)}: set data.tokenizer.type "
                f"to a BERT (WordPiece) tokenizer, such as a BERT checkpoint's directory or {tokenizer_path()}"
            )
        others = (getattr(tokenizer, name, None) for name in ("eos_id", "bos_id"))
        special = frozenset(v for v in (*ids.values(), *others) if v is not None)
        return cls(special=special, **ids)  # type: ignore[arg-type]


class Corpus:
    """Documents as consecutive sentences of token ids, in three flat arrays.

    ``tokens`` holds every sentence back to back; sentence ``s`` is
    ``tokens[sentence_starts[s]:sentence_starts[s + 1]]`` and document ``d`` holds sentences
    ``doc_starts[d]:doc_starts[d + 1]``. No sentence is longer than ``max_sentence`` tokens.
    """

    def __init__(self, documents: Iterable[Iterable[Sequence[int]]], max_sentence: int, source: str) -> None:
        pieces: list[np.ndarray] = []
        sentence_lengths: list[int] = []
        doc_sizes: list[int] = []
        for document in documents:
            count = 0
            for sentence in document:
                array = np.asarray(sentence, dtype=np.int32)  # half the memory of int64; any vocabulary fits
                # A sentence longer than a sample is cut into sample-sized pieces.
                for start in range(0, len(array), max_sentence):
                    piece = array[start : start + max_sentence]
                    pieces.append(piece)
                    sentence_lengths.append(len(piece))
                    count += 1
            if count:
                doc_sizes.append(count)
        if not pieces:
            raise NxdtError(f"{source}: no text to pre-train on")
        self.source = source
        self.tokens = np.concatenate(pieces)
        self.sentence_starts = np.concatenate([[0], np.cumsum(sentence_lengths)]).astype(np.int64)
        self.doc_starts = np.concatenate([[0], np.cumsum(doc_sizes)]).astype(np.int64)

    @property
    def num_documents(self) -> int:
        """Documents with at least one token."""
        return len(self.doc_starts) - 1

    def sentence(self, s: int) -> np.ndarray:
        """The token ids of sentence ``s``."""
        return self.tokens[self.sentence_starts[s] : self.sentence_starts[s + 1]]

    def spans(self, max_tokens: int) -> np.ndarray:
        """``[n, 3]`` (document, first sentence, end sentence): consecutive sentences filling at most ``max_tokens``."""
        lengths = np.diff(self.sentence_starts)
        out = []
        for d in range(self.num_documents):
            first, end = int(self.doc_starts[d]), int(self.doc_starts[d + 1])
            start, size = first, 0
            for s in range(first, end):
                if size and size + lengths[s] > max_tokens:
                    out.append((d, start, s))
                    start, size = s, 0
                size += int(lengths[s])
            out.append((d, start, end))
        return np.asarray(out, dtype=np.int64).reshape(-1, 3)


def split_sentences(tokens: np.ndarray, specials: SpecialTokens) -> list[np.ndarray]:
    """Sentences of an already tokenized document: [SEP], EOS and BOS end one; [CLS], [PAD] and [MASK] are dropped."""
    ends = {specials.sep, *(t for t in specials.special if t not in (specials.cls, specials.pad, specials.mask))}
    is_end = np.isin(tokens, list(ends))
    keep = ~np.isin(tokens, list(specials.special))
    sentences, start = [], 0
    for boundary in [*np.flatnonzero(is_end), len(tokens)]:
        piece = tokens[start:boundary][keep[start:boundary]]
        if len(piece):
            sentences.append(piece)
        start = boundary + 1
    return sentences


def text_corpus(files: Sequence[Path], tokenizer: Any, max_sentence: int, text_key: str = "text") -> Corpus:
    """Raw text files (the engine's reader) split into sentences and tokenized in batches."""
    from nxdt.data.bad_rows import BadRowReport
    from nxdt.data.records import iter_text_documents

    report = BadRowReport()
    sizes: list[int] = []
    sentences: list[list[int]] = []
    pending: list[str] = []

    def flush() -> None:
        sentences.extend(tokenizer.encode_batch(pending))
        pending.clear()

    for text in iter_text_documents(files, report, text_key=text_key):
        parts = [p for p in SENTENCE_END.split(text.strip()) if p]
        sizes.append(len(parts))
        pending.extend(parts)
        if len(pending) >= TOKENIZE_BATCH:
            flush()
    flush()
    report.check()
    report.log()
    bounds = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    documents = ([s for s in sentences[a:b] if s] for a, b in zip(bounds[:-1], bounds[1:]))
    return Corpus(documents, max_sentence, ", ".join(str(f) for f in files))


def hf_corpus(path: Path, split: str, tokenizer: Any, specials: SpecialTokens, max_sentence: int) -> Corpus:
    """A ``datasets.save_to_disk`` directory: one document per row, tokenized ``input_ids`` or a ``text`` column."""
    loaded = load_saved_split(path, split)
    if "input_ids" in loaded.column_names:
        rows = loaded.with_format("numpy", columns=["input_ids"])
        documents: Iterator[list[np.ndarray]] = (
            split_sentences(np.asarray(row["input_ids"], dtype=np.int64), specials) for row in rows
        )
        return Corpus(documents, max_sentence, str(path))
    if "text" in loaded.column_names:
        texts = [t for t in loaded["text"] if isinstance(t, str) and t.strip()]
        return _texts_corpus(texts, tokenizer, max_sentence, str(path))
    raise NxdtError(f"{path}: no column 'input_ids' or 'text' (columns: {loaded.column_names})")


def _texts_corpus(texts: Sequence[str], tokenizer: Any, max_sentence: int, source: str) -> Corpus:
    parts = [[p for p in SENTENCE_END.split(t.strip()) if p] for t in texts]
    flat = [p for doc in parts for p in doc]
    ids = [ids for start in range(0, len(flat), TOKENIZE_BATCH) for ids in tokenizer.encode_batch(flat[start : start + TOKENIZE_BATCH])]
    bounds = np.concatenate([[0], np.cumsum([len(p) for p in parts])]).astype(np.int64)
    return Corpus(([s for s in ids[a:b] if s] for a, b in zip(bounds[:-1], bounds[1:])), max_sentence, source)


def megatron_corpus(prefix: str, specials: SpecialTokens, max_sentence: int) -> Corpus:
    """A Megatron indexed dataset: its documents (``doc_idx``), each sequence split at [SEP]/EOS into sentences."""
    from nxdt.data.megatron import IndexedDataset

    indexed = IndexedDataset(prefix)
    doc_idx = np.asarray(indexed.doc_idx, dtype=np.int64)
    documents = (
        [s for seq in range(int(a), int(b)) for s in split_sentences(np.asarray(indexed.get(seq), dtype=np.int64), specials)]
        for a, b in zip(doc_idx[:-1], doc_idx[1:])
    )
    return Corpus(documents, max_sentence, str(indexed.prefix))


class MaskedLMDataset(Dataset):
    """BERT samples over ``spans`` of a corpus (see the module docstring); ``copies`` masked copies of each."""

    def __init__(
        self,
        corpus: Corpus,
        spans: np.ndarray,
        seq_length: int,
        specials: SpecialTokens,
        vocab_size: int,
        *,
        pairs: bool,
        copies: int = 1,
        seed: int = 1234,
    ) -> None:
        if len(spans) == 0:
            raise NxdtError(f"{corpus.source}: no samples for masked-LM pre-training")
        self.corpus, self.spans, self.seq_length, self.t = corpus, spans, seq_length, specials
        self.pairs, self.copies, self.seed = pairs, copies, seed
        self.max_tokens = seq_length - (3 if pairs else 2)
        # Random replacements are ordinary tokens only.
        self.replacements = np.setdiff1d(np.arange(vocab_size), np.fromiter(specials.special, dtype=np.int64))

    def __len__(self) -> int:
        return len(self.spans) * self.copies

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        rng = np.random.default_rng([self.seed, index])
        doc, first, end = (int(v) for v in self.spans[index % len(self.spans)])
        sentences = [self.corpus.sentence(s) for s in range(first, end)]
        item: dict[str, torch.Tensor] = {}
        if self.pairs:
            a, b, random_next = self._pair(sentences, doc, rng)
            item["next_sentence_label"] = torch.tensor(int(random_next))
        else:
            a, b = np.concatenate(sentences)[: self.max_tokens], None
        ids, types = self._layout(a, b)
        n_real = len(ids)
        ids, labels = self._mask(ids, rng)
        pad = self.seq_length - n_real
        item.update(
            input_ids=torch.from_numpy(np.concatenate([ids, np.full(pad, self.t.pad)])),
            labels=torch.from_numpy(np.concatenate([labels, np.full(pad, IGNORE_INDEX)])),
            attention_mask=torch.from_numpy(np.concatenate([np.ones(n_real), np.zeros(pad)]).astype(np.int64)),
            token_type_ids=torch.from_numpy(np.concatenate([types, np.zeros(pad, dtype=np.int64)])),
        )
        return item

    def _pair(self, sentences: list[np.ndarray], doc: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, bool]:
        """Segments A and B and whether B is random text (NSP label 1) rather than A's continuation (0)."""
        if len(sentences) == 1 and len(sentences[0]) > 1:
            # One long sentence: its two halves at a random point stand in for two sentences.
            cut = int(rng.integers(1, len(sentences[0])))
            sentences = [sentences[0][:cut], sentences[0][cut:]]
        random_next = len(sentences) < 2 or rng.random() < RANDOM_NEXT_PROB
        a_end = int(rng.integers(1, len(sentences))) if len(sentences) > 1 else 1
        a = np.concatenate(sentences[:a_end])
        if random_next:
            b = self._random_text(doc, self.max_tokens - min(len(a), self.max_tokens - 1), rng)
        else:
            b = np.concatenate(sentences[a_end:])
        # Google BERT's truncate_seq_pair: trim the longer segment, from a random end, until both fit.
        while len(a) + len(b) > self.max_tokens:
            if len(a) >= len(b):
                a = a[1:] if rng.random() < 0.5 else a[:-1]
            else:
                b = b[1:] if rng.random() < 0.5 else b[:-1]
        return a, b, random_next

    def _random_text(self, doc: int, length: int, rng: np.random.Generator) -> np.ndarray:
        """Up to ``length`` tokens of another document (chosen at random), from one of its sentences on."""
        n_docs = self.corpus.num_documents
        other = int(rng.integers(0, n_docs - 1)) if n_docs > 1 else doc
        if n_docs > 1 and other >= doc:
            other += 1
        first, end = int(self.corpus.doc_starts[other]), int(self.corpus.doc_starts[other + 1])
        s = int(rng.integers(first, end))
        return self.corpus.tokens[self.corpus.sentence_starts[s] : self.corpus.sentence_starts[end]][:length]

    def _layout(self, a: np.ndarray, b: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """``[CLS] A [SEP] (B [SEP])`` and its token types (0 for the first segment, 1 for the second)."""
        first = np.concatenate([[self.t.cls], a, [self.t.sep]]).astype(np.int64)
        if b is None:
            return first, np.zeros(len(first), dtype=np.int64)
        second = np.concatenate([b, [self.t.sep]]).astype(np.int64)
        return np.concatenate([first, second]), np.concatenate([np.zeros(len(first)), np.ones(len(second))]).astype(np.int64)

    def _mask(self, ids: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Choose 15% of the maskable tokens; 80% -> [MASK], 10% -> a random token, 10% unchanged."""
        candidates = np.flatnonzero((ids != self.t.cls) & (ids != self.t.sep))
        n = max(1, int(round(len(candidates) * MASK_PROB)))
        chosen = np.sort(rng.choice(candidates, size=min(n, len(candidates)), replace=False))
        labels = np.full(len(ids), IGNORE_INDEX, dtype=np.int64)
        labels[chosen] = ids[chosen]
        masked = ids.copy()
        draw = rng.random(len(chosen))
        masked[chosen[draw < MASK_TOKEN_PROB]] = self.t.mask
        swap = chosen[(draw >= MASK_TOKEN_PROB) & (draw < MASK_TOKEN_PROB + RANDOM_TOKEN_PROB)]
        masked[swap] = rng.choice(self.replacements, size=len(swap))
        return masked, labels


# -- the recipe's dataset builder ---------------------------------------------------------------------
def next_sentence_pairs(run_config: Any) -> bool:
    """Whether the run's model has the next-sentence head (and so trains on sentence pairs)."""
    from nxdt.resolve import architecture_config
    from nxdt_bert.plugin import BERT_SPEC

    return bool(getattr(architecture_config(BERT_SPEC, run_config), "next_sentence", False))


#: a source: ("megatron", prefix) or ("path", an HF datasets directory or text files)
Source = tuple[str, str]


def build_masked_lm_dataset(run_config: Any, tokenizer: Any, split: str) -> Dataset | None:
    """The masked-LM samples of ``split``, from the sources the causal ``pretrain`` recipe reads.

    Megatron ``data_prefix`` (a blend, or a dict with train/validation prefixes), ``train_dir`` /
    ``val_dir``, else the embedded corpus with its last 5% of spans held out for validation;
    ``splits_string`` cuts one source's spans into train/validation/test shares instead.
    """
    from nxdt.recipes.datasets import split_weights

    data = run_config.data
    for key in ("eod_mask_loss", "reset_position_ids", "reset_attention_mask"):
        if getattr(data, key):
            raise ConfigError(
                f"data.{key}: masked-LM samples hold one document each and no end-of-document tokens; set it to false"
            )
    builder = _Builder(run_config, tokenizer)
    if data.splits_string:
        if data.val_dir or isinstance(data.data_prefix, dict):
            raise ConfigError(
                "data.splits_string cuts one source into train/validation/test, but data.val_dir or a "
                "data_prefix with splits already names the validation data; drop one of them"
            )
        if data.data_prefix:
            sources = _megatron(data.data_prefix)
        else:
            sources = [(1.0, ("path", str(data.train_dir or _embedded_corpus())))]
        return builder.build(sources, split, shares=split_weights(data.splits_string))
    if data.data_prefix:
        prefix = data.data_prefix
        if isinstance(prefix, dict):
            prefix = prefix.get("train" if split == "train" else "validation")
            if not prefix:
                return None
        elif split != "train":
            return None
        return builder.build(_megatron(prefix), split)
    explicit = data.train_dir if split == "train" else data.val_dir
    if explicit:
        return builder.build([(1.0, ("path", str(explicit)))], split)
    if split != "train" and data.train_dir:
        return None
    return builder.build([(1.0, ("path", _embedded_corpus()))], split, held_out=True)


class _Builder:
    """Corpora -> masked-LM datasets for one run (its tokens, sequence length, head set and seed)."""

    def __init__(self, run_config: Any, tokenizer: Any) -> None:
        data = run_config.data
        self.tokenizer = tokenizer
        self.specials = SpecialTokens.of(tokenizer)
        self.pairs = next_sentence_pairs(run_config)
        self.seq = data.seq_length
        self.max_tokens = self.seq - (3 if self.pairs else 2)
        if self.max_tokens < 2:
            raise ConfigError(f"data.seq_length={self.seq} leaves no room for text between BERT's special tokens")
        self.seed = data.seed if data.seed is not None else run_config.seed

    def build(
        self, sources: list[tuple[float, Source]], split: str, shares: list[float] | None = None, held_out: bool = False
    ) -> Dataset | None:
        """One dataset over ``sources`` (a weighted blend of several) for ``split``."""
        from nxdt.data.blend import BlendedDataset
        from nxdt.recipes.datasets import HELD_OUT_FRACTION

        train = split == "train"
        parts: list[tuple[float, MaskedLMDataset]] = []
        for weight, source in sources:
            # A datasets.save_to_disk dict is read at the split asked for, unless one source is being cut.
            corpus = self.corpus(source, "train" if shares or held_out else split)
            spans = corpus.spans(self.max_tokens)
            if shares is not None:
                bounds = np.round(np.cumsum([0.0, *shares]) * len(spans)).astype(int)
                part = ("train", "validation", "test").index(split if split in ("train", "test") else "validation")
                spans = spans[bounds[part] : bounds[part + 1]]
            elif held_out:
                held = max(1, int(len(spans) * HELD_OUT_FRACTION))
                spans = spans[:-held] if train else spans[-held:]
            if len(spans):
                parts.append((weight, MaskedLMDataset(
                    corpus, spans, self.seq, self.specials, self.tokenizer.vocab_size,
                    pairs=self.pairs, copies=TRAIN_COPIES if train else 1, seed=self.seed,
                )))
        if not parts:
            if train:
                raise ConfigError(f"no training samples for masked-LM pre-training in {[s for _, (_, s) in sources]}")
            return None
        if len(parts) == 1:
            return parts[0][1]
        return BlendedDataset([w for w, _ in parts], [d for _, d in parts], sum(len(d) for _, d in parts), self.seed)

    def corpus(self, source: Source, split: str) -> Corpus:
        """The corpus of one source."""
        from nxdt.data.records import TEXT_SUFFIXES, expand_paths
        from nxdt.recipes.datasets import _is_hf_dataset_dir

        kind, where = source
        if kind == "megatron":
            return megatron_corpus(where, self.specials, self.max_tokens)
        path = Path(where).expanduser()
        if not path.exists():
            raise NxdtError(f"data path not found: {path}")
        if _is_hf_dataset_dir(path):
            return hf_corpus(path, split, self.tokenizer, self.specials, self.max_tokens)
        return text_corpus(expand_paths(path, TEXT_SUFFIXES), self.tokenizer, self.max_tokens)


def _megatron(prefix: Any) -> list[tuple[float, Source]]:
    from nxdt.data.megatron import parse_data_prefix

    return [(weight, ("megatron", path)) for weight, path in parse_data_prefix(prefix)]


def _embedded_corpus() -> str:
    from nxdt.data.embedded import embedded_paths

    return str(embedded_paths()["pretrain_txt"])
