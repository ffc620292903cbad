"""Supervised fine-tuning datasets: JSONL prompt/answer rows, packed or padded to ``seq_length``.

Files are JSON Lines (``.jsonl``, or ``.json`` holding JSON Lines); two row formats, detected per
row:

* NxDT's ``{"input": ..., "output": ...}``: tokens are ``[BOS] input output EOS`` (BOS when the
  tokenizer has one and ``add_bos``); input and output are tokenized separately, exactly as a
  prompt is at generation time (see ``prompt_ids``), and only ``output EOS`` is trained on.
* ``{"messages": [{"role": ..., "content": ...}, ...]}`` rendered with the tokenizer's chat
  template; every assistant turn (its content and whatever the template closes it with, such as
  EOS) is trained on, every other token is masked (see ``tokenize_chat``).

Labels are shifted (``labels[t]`` is the target of position ``t``) and the last position of
every example has label -100: nothing is ever predicted across examples, and the EOS that ends an
example is the target of the position before it. ``packing=True`` fills blocks greedily in file
order (a new block starts when the next example does not fit) with position ids restarting at 0
per example; ``packing=False`` puts one example per row. Either way the tail is padded with
``pad_id``, label -100 and position id 0. Tokens of different examples packed in one block are
told apart by their position ids restarting at 0; attention masking across them is the model's
business.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jinja2 import TemplateError
from torch.utils.data import Dataset

from nxdt.data.bad_rows import BadRowReport, logger
from nxdt.data.batch import IGNORE_INDEX
from nxdt.data.records import expand_paths, iter_jsonl, text_field
from nxdt.data.tokenizer import Tokenizer
from nxdt.errors import NxdtError

OVERLONG_POLICIES = ("skip", "truncate")
ROLES = ("system", "user", "assistant", "tool")


def prompt_ids(tokenizer: Tokenizer, prompt: str, add_bos: bool = True) -> list[int]:
    """Token ids a generation for ``prompt`` starts from (what training saw before the answer)."""
    bos = [tokenizer.bos_id] if add_bos and tokenizer.bos_id is not None else []
    return bos + tokenizer.encode(prompt)


def tokenize_pair(
    tokenizer: Tokenizer,
    prompt: str,
    answer: str,
    add_bos: bool = True,
    encoded: tuple[list[int], list[int]] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(token ids, target mask) of an input/output row; ``encoded`` passes pre-tokenized parts."""
    prompt_part, answer_part = (
        encoded if encoded is not None else (tokenizer.encode(prompt), tokenizer.encode(answer))
    )
    bos = [tokenizer.bos_id] if add_bos and tokenizer.bos_id is not None else []
    prompt_tokens = bos + list(prompt_part)
    answer_tokens = list(answer_part) + [tokenizer.eos_id]
    ids = np.asarray(prompt_tokens + answer_tokens, dtype=np.int64)
    mask = np.zeros(len(ids), dtype=bool)
    mask[len(prompt_tokens) :] = True
    return ids, mask


def validate_messages(messages: Any) -> str | None:
    """Why ``messages`` is not a usable conversation, or None when it is."""
    if not isinstance(messages, list) or not messages:
        return "'messages' is not a non-empty list"
    for number, message in enumerate(messages, start=1):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            return f"message {number} has no string 'content'"
        if message.get("role") not in ROLES:
            return f"message {number} has role {message.get('role')!r}, not one of {ROLES}"
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        return "no non-empty assistant message"
    return None


def tokenize_chat(tokenizer: Tokenizer, messages: Sequence[dict[str, str]]) -> tuple[np.ndarray, np.ndarray]:
    """(token ids, target mask) of a conversation: assistant turns are targets, the rest is masked.

    Each assistant turn spans from the end of the rendered prefix before it (with the generation
    prompt) to the end of the rendered prefix that includes it. The whole conversation is encoded
    once when those prefixes encode to token prefixes of it (true of templates that separate turns
    with special tokens); otherwise each span is encoded on its own. A template that does not render
    prefixes as prefixes of the whole raises ValueError.
    """
    full_text = tokenizer.render_chat(messages)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = tokenizer.render_chat(messages[:i], add_generation_prompt=True)
        through = tokenizer.render_chat(messages[: i + 1])
        if not (
            full_text.startswith(before) and full_text.startswith(through) and len(before) <= len(through)
        ):
            raise ValueError("the chat template does not render a conversation's prefixes as its prefixes")
        spans.append((len(before), len(through)))
    cuts = sorted({0, len(full_text), *(c for span in spans for c in span)})

    full_ids = tokenizer.encode(full_text)
    token_cuts = []
    for cut in cuts:
        if cut == 0:
            prefix_ids = []
        elif cut == len(full_text):
            prefix_ids = full_ids
        else:
            prefix_ids = tokenizer.encode(full_text[:cut])
        if full_ids[: len(prefix_ids)] != prefix_ids:
            break
        token_cuts.append(len(prefix_ids))
    if len(token_cuts) == len(cuts):
        ids = full_ids
    else:  # not prefix-stable: encode piece by piece so the boundaries are exact
        pieces = [tokenizer.encode(full_text[a:b]) for a, b in zip(cuts[:-1], cuts[1:], strict=True)]
        ids = [t for piece in pieces for t in piece]
        token_cuts = list(np.cumsum([0] + [len(p) for p in pieces]))
    mask = np.zeros(len(ids), dtype=bool)
    for start, end in spans:
        mask[token_cuts[cuts.index(start)] : token_cuts[cuts.index(end)]] = True
    return np.asarray(ids, dtype=np.int64), mask


class SFTDataset(Dataset):
    """Prompt/answer JSONL rows (see the module docstring), packed or padded to ``seq_length``.

    ``overlong`` is "skip" (an example longer than ``seq_length`` is a bad row) or "truncate" (keep
    its first ``seq_length`` tokens). ``dev_choose_samples`` keeps only the first N good examples.
    """

    def __init__(
        self,
        inputs: str | Path | Iterable[str | Path],
        tokenizer: Tokenizer,
        seq_length: int,
        packing: bool = False,
        overlong: str = "skip",
        dev_choose_samples: int | None = None,
        add_bos: bool = True,
        max_bad_fraction: float = 0.5,
    ) -> None:
        if overlong not in OVERLONG_POLICIES:
            raise NxdtError(f"overlong must be one of {OVERLONG_POLICIES}, got {overlong!r}")
        self.files = expand_paths(inputs, (".jsonl", ".json"))
        self.tokenizer, self.seq_length, self.packing = tokenizer, seq_length, packing
        self.overlong, self.add_bos = overlong, add_bos
        self.bad_rows = BadRowReport(max_bad_fraction)
        self.truncated = 0
        self.examples: list[tuple[np.ndarray, np.ndarray]] = []
        self._read(dev_choose_samples)
        self.bad_rows.check()
        self.bad_rows.log()
        if self.truncated:
            logger.warning("%d SFT examples truncated to seq_length %d", self.truncated, seq_length)
        if not self.examples:
            raise NxdtError(f"no usable SFT examples in {', '.join(str(f) for f in self.files)}")
        self.blocks = self._pack() if packing else [[i] for i in range(len(self.examples))]

    def _read(self, limit: int | None) -> None:
        # Rows are tokenized a chunk at a time so input/output rows go through batched encoding.
        chunk: list[tuple[Path, int, dict[str, Any]]] = []
        for path in self.files:
            for line, record in iter_jsonl(path, self.bad_rows):
                chunk.append((path, line, record))
                # With a limit, read no further than it may need, so rows past it go unreported.
                if len(chunk) >= (1024 if limit is None else max(1, limit - len(self.examples))):
                    self._add_chunk(chunk, limit)
                    chunk = []
                if limit is not None and len(self.examples) >= limit:
                    return
        self._add_chunk(chunk, limit)

    def _add_chunk(self, chunk: list[tuple[Path, int, dict[str, Any]]], limit: int | None) -> None:
        pairs: dict[int, tuple[str, str]] = {}
        for n, (path, line, record) in enumerate(chunk):
            if "messages" not in record:
                prompt = text_field(record, "input", path, line, self.bad_rows)
                answer = (
                    text_field(record, "output", path, line, self.bad_rows) if prompt is not None else None
                )
                if answer is not None:
                    pairs[n] = (prompt, answer)  # type: ignore[assignment]
        prompts = self.tokenizer.encode_batch([p for p, _ in pairs.values()])
        answers = self.tokenizer.encode_batch([a for _, a in pairs.values()])
        encoded = dict(zip(pairs, zip(prompts, answers, strict=True), strict=True))
        for n, (path, line, record) in enumerate(chunk):
            if limit is not None and len(self.examples) >= limit:
                return
            if n in encoded:
                example = tokenize_pair(self.tokenizer, *pairs[n], add_bos=self.add_bos, encoded=encoded[n])
            elif "messages" in record:
                problem = validate_messages(record["messages"])
                if problem:
                    self.bad_rows.add(str(path), line, "invalid messages", problem)
                    continue
                try:
                    example = tokenize_chat(self.tokenizer, record["messages"])
                except (ValueError, TemplateError) as err:  # templates reject e.g. non-alternating roles
                    self.bad_rows.add(str(path), line, "chat template", str(err))
                    continue
            else:
                continue  # already reported by text_field
            self._add_example(example, path, line)

    def _add_example(self, example: tuple[np.ndarray, np.ndarray], path: Path, line: int) -> None:
        ids, mask = example
        if len(ids) > self.seq_length:
            if self.overlong == "skip":
                message = f"longer than seq_length ({len(ids)} > {self.seq_length})"
                self.bad_rows.add(str(path), line, "longer than seq_length", message=message)
                return
            ids, mask = ids[: self.seq_length], mask[: self.seq_length]
            if not mask[1:].any():
                self.bad_rows.add(
                    str(path), line, "no answer tokens within seq_length", f"prompt of {len(ids)}+ tokens"
                )
                return
            self.truncated += 1
        self.examples.append((ids, mask))

    def _pack(self) -> list[list[int]]:
        blocks: list[list[int]] = []
        used = self.seq_length  # forces a first block
        for index, (ids, _) in enumerate(self.examples):
            if used + len(ids) > self.seq_length:
                blocks.append([])
                used = 0
            blocks[-1].append(index)
            used += len(ids)
        return blocks

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        input_ids = np.full(self.seq_length, self.tokenizer.pad_id, dtype=np.int64)
        labels = np.full(self.seq_length, IGNORE_INDEX, dtype=np.int64)
        position_ids = np.zeros(self.seq_length, dtype=np.int64)
        cursor = 0
        for example in self.blocks[index]:
            ids, mask = self.examples[example]
            n = len(ids)
            input_ids[cursor : cursor + n] = ids
            # Position t predicts token t+1 of the same example; the example's last position
            # keeps -100 so no target crosses into the next example.
            labels[cursor : cursor + n - 1] = np.where(mask[1:], ids[1:], IGNORE_INDEX)
            position_ids[cursor : cursor + n] = np.arange(n)
            cursor += n
        return {
            "input_ids": torch.from_numpy(input_ids),
            "labels": torch.from_numpy(labels),
            "position_ids": torch.from_numpy(position_ids),
        }
