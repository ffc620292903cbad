"""Preference-pair datasets for DPO and ORPO: a prompt with a chosen and a rejected response.

Sources: JSON Lines (``.jsonl``, or ``.json`` holding JSON Lines), ``.parquet`` files and
``datasets.save_to_disk`` directories (a DatasetDict gives its ``train`` / ``validation`` split),
each row holding ``prompt``, ``chosen`` and ``rejected``. Two row formats, detected per row:

* Strings: the prompt's tokens are ``[BOS] prompt`` (BOS when the tokenizer has one) and each
  response's ``response EOS``; prompt and responses are tokenized separately, exactly as a prompt
  is at generation time (as for SFT input/output rows).
* Chat: ``prompt`` is a list of messages and ``chosen`` / ``rejected`` are lists of assistant
  messages (or one string each, taken as one assistant message). The prompt is the tokenizer's
  chat template applied to the prompt messages with the generation prompt; a response is the
  text the template adds after it for ``prompt + response`` (so it ends with whatever the
  template closes an assistant turn with, such as EOS). A template that does not render the
  prompt as a prefix of the whole conversation makes the row bad.

Only response tokens are trained on (the prompt is masked with -100); labels are shifted as
everywhere in nxdt (``labels[t]`` is the target of position ``t``). Truncation (``seq_length`` =
``data.seq_length``), as TRL did before its 1.0 rewrite: when the prompt and the longer response
do not fit, a prompt longer than ``max_prompt_length`` is cut to that many tokens, keeping its
start (``keep_start``) or its end (``keep_end``; a leading BOS is kept either way); if they still
do not fit, both responses are cut to the room left (their starts are kept). A row with no room
for a response, an empty field, or identical responses is a bad row, reported with its file and
line like SFT rows.

An item is one pair: ``input_ids`` and ``labels`` of shape ``[2, length]`` (row 0 chosen, row 1
rejected), and after DPO's reference pass ``ref_logps`` of shape ``[2]``. ``collate`` concatenates
items, so a micro-batch of ``n`` pairs holds ``2n`` rows ``c0, r0, c1, r1, ...``. ``length`` is
``seq_length``, or with ``pad_multiple`` the dataset's longest pair rounded up to that multiple
(at most ``seq_length``): right padding changes nothing a causal model computes for the tokens
before it, and short pairs then cost no compute on padding.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jinja2 import TemplateError
from torch.utils.data import Dataset

from nxdt.data.bad_rows import BadRowReport, logger
from nxdt.data.batch import IGNORE_INDEX
from nxdt.data.records import expand_paths, iter_jsonl, load_saved_split
from nxdt.data.sft import validate_messages
from nxdt.data.tokenizer import Tokenizer
from nxdt.errors import NxdtError

TRUNCATION_MODES = ("keep_start", "keep_end")
FIELDS = ("prompt", "chosen", "rejected")


@dataclass(frozen=True)
class Truncation:
    """How a pair is fitted into ``seq_length`` tokens (see the module docstring)."""

    seq_length: int
    max_prompt_length: int | None = None
    mode: str = "keep_start"


def fit_pair(
    prompt: list[int], chosen: list[int], rejected: list[int], rule: Truncation, bos_id: int | None = None
) -> tuple[list[int], list[int], list[int], bool]:
    """(prompt, chosen, rejected, truncated) cut to fit ``rule``; responses may come back empty."""
    longest = max(len(chosen), len(rejected))
    truncated = False
    if len(prompt) + longest > rule.seq_length and rule.max_prompt_length and len(prompt) > rule.max_prompt_length:
        keep = rule.max_prompt_length
        if rule.mode == "keep_end":
            # A leading BOS stays: the model always saw sequences start with it.
            head = prompt[:1] if bos_id is not None and prompt[:1] == [bos_id] and keep > 1 else []
            prompt = head + prompt[len(prompt) - (keep - len(head)) :]
        else:
            prompt = prompt[:keep]
        truncated = True
    room = rule.seq_length - len(prompt)
    if longest > room:
        chosen, rejected = chosen[: max(room, 0)], rejected[: max(room, 0)]
        truncated = True
    return prompt, chosen, rejected, truncated


def pair_arrays(prompt: Sequence[int], chosen: Sequence[int], rejected: Sequence[int], seq_length: int,
                pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """``input_ids`` and shifted ``labels`` ``[2, seq_length]`` of a pair (prompt masked, right-padded)."""
    ids = np.full((2, seq_length), pad_id, dtype=np.int64)
    labels = np.full((2, seq_length), IGNORE_INDEX, dtype=np.int64)
    for row, response in enumerate((chosen, rejected)):
        tokens = [*prompt, *response]
        ids[row, : len(tokens)] = tokens
        # Position t predicts token t + 1: the response's tokens are the targets of the positions before them.
        labels[row, len(prompt) - 1 : len(tokens) - 1] = response
    return ids, labels


def _as_messages(value: Any, role: str = "assistant") -> list[dict[str, str]] | None:
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    return value if isinstance(value, list) else None


def chat_parts(tokenizer: Tokenizer, prompt: Any, chosen: Any, rejected: Any) -> tuple[list[int], list[int], list[int]]:
    """Token ids of a chat pair's prompt and responses; ValueError says why a row cannot be used."""
    responses = []
    for name, value in (("chosen", chosen), ("rejected", rejected)):
        messages = _as_messages(value)
        if not messages or any(not isinstance(m, dict) or m.get("role") != "assistant" for m in messages):
            raise ValueError(f"'{name}' is not a string or a list of assistant messages")
        responses.append(messages)
    problem = validate_messages([*prompt, *responses[0]])
    if problem:
        raise ValueError(problem)
    prompt_text = tokenizer.render_chat(prompt, add_generation_prompt=True)
    parts = [tokenizer.encode(prompt_text)]
    for messages in responses:
        full = tokenizer.render_chat([*prompt, *messages])
        if not full.startswith(prompt_text):
            raise ValueError("the chat template does not render the prompt as a prefix of the conversation")
        parts.append(tokenizer.encode(full[len(prompt_text) :]))
    return parts[0], parts[1], parts[2]


def iter_rows(path: Path, report: BadRowReport, split: str) -> Iterator[tuple[int, dict[str, Any], str]]:
    """(1-based line or row number, record, unit) of a JSONL file, a parquet file or a save_to_disk directory."""
    if path.suffix in (".jsonl", ".json"):
        for line, record in iter_jsonl(path, report):
            yield line, record, "line"
        return
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        rows: Iterable[dict[str, Any]] = pq.read_table(path).to_pylist()
    else:
        rows = load_saved_split(path, split)
    for number, record in enumerate(rows, start=1):
        report.count_read(str(path))
        yield number, dict(record), "row"


def preference_files(source: str | Path | Iterable[str | Path]) -> list[Path]:
    """The files (or save_to_disk directories) a ``data.train_dir`` / ``val_dir`` names."""
    entries = [source] if isinstance(source, (str, Path)) else list(source)
    out: list[Path] = []
    for entry in entries:
        path = Path(entry).expanduser()
        if path.is_dir() and any((path / n).exists() for n in ("dataset_info.json", "state.json", "dataset_dict.json")):
            out.append(path)
        else:
            out += expand_paths(path, (".jsonl", ".json", ".parquet"))
    return out


class PreferenceDataset(Dataset):
    """Prompt / chosen / rejected rows (see the module docstring) as padded pairs of ``seq_length`` tokens."""

    def __init__(
        self,
        inputs: str | Path | Iterable[str | Path],
        tokenizer: Tokenizer,
        seq_length: int,
        max_prompt_length: int | None = None,
        truncation_mode: str = "keep_start",
        split: str = "train",
        dev_choose_samples: int | None = None,
        max_bad_fraction: float = 0.5,
        pad_multiple: int | None = None,
    ) -> None:
        if truncation_mode not in TRUNCATION_MODES:
            raise NxdtError(f"truncation_mode must be one of {TRUNCATION_MODES}, got {truncation_mode!r}")
        self.files = preference_files(inputs)
        self.tokenizer, self.seq_length = tokenizer, seq_length
        self.rule = Truncation(seq_length, max_prompt_length, truncation_mode)
        self.bad_rows = BadRowReport(max_bad_fraction)
        self.truncated = 0
        self.pairs: list[tuple[list[int], list[int], list[int]]] = []
        #: per-pair reference log-probs ``[pairs, 2]`` once DPO's reference pass has run
        self.ref_logps: torch.Tensor | None = None
        self._read(split, dev_choose_samples)
        self.bad_rows.check()
        self.bad_rows.log()
        if self.truncated:
            logger.warning("%d preference pairs truncated to seq_length %d", self.truncated, seq_length)
        if not self.pairs:
            raise NxdtError(f"no usable preference pairs in {', '.join(str(f) for f in self.files)}")
        self.length = seq_length
        if pad_multiple:
            longest = max(len(p) + max(len(c), len(r)) for p, c, r in self.pairs)
            self.length = min(seq_length, -(-longest // pad_multiple) * pad_multiple)

    def _read(self, split: str, limit: int | None) -> None:
        for path in self.files:
            chunk: list[tuple[int, dict[str, Any], str]] = []
            for row in iter_rows(path, self.bad_rows, split):
                chunk.append(row)
                if len(chunk) >= 1024:
                    self._add_chunk(path, chunk, limit)
                    chunk = []
                if limit is not None and len(self.pairs) >= limit:
                    return
            self._add_chunk(path, chunk, limit)

    def _problem(self, record: dict[str, Any]) -> str | None:
        for key in FIELDS:
            if record.get(key) is None:
                return f"missing field {key!r}"
        kinds = {k: isinstance(record[k], str) for k in FIELDS}
        if kinds["prompt"]:
            bad = [k for k in ("chosen", "rejected") if not kinds[k]]
            if bad:
                return f"field {bad[0]!r} is not a string (the prompt is one)"
            empty = [k for k in FIELDS if not record[k].strip()]
            if empty:
                return f"empty field {empty[0]!r}"
        elif not isinstance(record["prompt"], list) or not record["prompt"]:
            return "field 'prompt' is neither a string nor a non-empty list of messages"
        if record["chosen"] == record["rejected"]:
            return "chosen and rejected are identical"
        return None

    def _add_chunk(self, path: Path, chunk: list[tuple[int, dict[str, Any], str]], limit: int | None) -> None:
        good = []
        for number, record, unit in chunk:
            problem = self._problem(record)
            if problem:
                self.bad_rows.add(str(path), number, problem.split(" (")[0], unit=unit, message=problem)
            else:
                good.append((number, record, unit))
        strings = [(n, r) for n, r, _ in good if isinstance(r["prompt"], str)]
        # String rows are tokenized a chunk at a time through the tokenizer's batched encoder.
        columns = [self.tokenizer.encode_batch([r[k] for _, r in strings]) for k in FIELDS]
        encoded = {n: parts for (n, _), parts in zip(strings, zip(*columns), strict=True)}
        bos = [self.tokenizer.bos_id] if self.tokenizer.bos_id is not None else []
        eos = [self.tokenizer.eos_id]
        for number, record, unit in good:
            if limit is not None and len(self.pairs) >= limit:
                return
            if number in encoded:
                p, c, r = encoded[number]
                parts = (bos + list(p), list(c) + eos, list(r) + eos)
            else:
                try:
                    parts = chat_parts(self.tokenizer, record["prompt"], record["chosen"], record["rejected"])
                except (ValueError, TemplateError) as err:
                    self.bad_rows.add(str(path), number, "invalid chat pair", str(err), unit=unit)
                    continue
            prompt, chosen, rejected, cut = fit_pair(*parts, self.rule, self.tokenizer.bos_id)
            if not prompt or not chosen or not rejected:
                detail = f"a prompt of {len(parts[0])} tokens leaves no room for a response in seq_length " \
                         f"{self.seq_length}; set max_prompt_length"
                self.bad_rows.add(str(path), number, "no response tokens within seq_length", detail, unit=unit)
                continue
            self.truncated += cut
            self.pairs.append((prompt, chosen, rejected))

    def set_reference(self, ref_logps: torch.Tensor) -> None:
        """Attach per-pair reference log-probs ``[pairs, 2]``; items then carry ``ref_logps``."""
        if tuple(ref_logps.shape) != (len(self.pairs), 2):
            raise ValueError(f"ref_logps has shape {tuple(ref_logps.shape)}, expected ({len(self.pairs)}, 2)")
        self.ref_logps = ref_logps.detach().float().cpu()

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids, labels = pair_arrays(*self.pairs[index], self.length, self.tokenizer.pad_id)
        item = {"input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(labels)}
        if self.ref_logps is not None:
            item["ref_logps"] = self.ref_logps[index].clone()
        return item
