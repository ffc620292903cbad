"""Reading records from data files with 1-based line numbers, reporting the unusable ones.

Text corpora: ``.txt`` files hold one document per paragraph (documents are separated by one or
more blank lines, so a document may span several lines), ``.jsonl`` files one JSON object per
line with the text under ``text_key``, ``.parquet`` files a ``text_key`` column. Directories are
searched recursively and read in sorted order, so the token stream is the same on every rank.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from nxdt.data.bad_rows import BadRowReport
from nxdt.errors import NxdtError

TEXT_SUFFIXES = (".txt", ".jsonl", ".parquet")


def expand_paths(inputs: str | Path | Iterable[str | Path], suffixes: tuple[str, ...]) -> list[Path]:
    """Files named by ``inputs`` (files, or directories searched recursively for ``suffixes``)."""
    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    files: list[Path] = []
    for entry in inputs:
        path = Path(entry).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in suffixes)
            if not found:
                raise NxdtError(f"no {'/'.join(suffixes)} files in directory {path}")
            files.extend(found)
        elif path.is_file():
            if path.suffix not in suffixes:
                raise NxdtError(f"{path}: unsupported file type {path.suffix!r}; expected one of {suffixes}")
            files.append(path)
        else:
            raise NxdtError(f"data file not found: {path}")
    if not files:
        raise NxdtError("no data files given")
    return files


def text_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, line) of a UTF-8 text file; binary or non-UTF-8 content fails with the file named.

    Decoding with replacement would turn a binary file (an archive, a .bin shard named .txt) into
    garbage tokens silently, so the first NUL byte or invalid UTF-8 sequence stops the run.
    """
    line_no = 0
    with open(path, encoding="utf-8", errors="strict") as handle:  # universal newlines, as before
        try:
            for line_no, line in enumerate(handle, start=1):
                if "\x00" in line:
                    raise NxdtError(f"{path}: binary data (a NUL byte on line {line_no}); text data must be UTF-8 text")
                yield line_no, line
        except UnicodeDecodeError as exc:
            raise NxdtError(f"{path}: binary or non-UTF-8 data (byte 0x{exc.object[exc.start]:02x}); text data must be "
                            "UTF-8 text") from None


def iter_jsonl(path: Path, report: BadRowReport) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each JSON object line; blank lines are not rows."""
    for line_no, line in text_lines(path):
        if not line.strip():
            continue
        report.count_read(str(path))
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            report.add(str(path), line_no, "invalid JSON", str(err))
            continue
        if not isinstance(record, dict):
            report.add(str(path), line_no, "not a JSON object", type(record).__name__)
            continue
        yield line_no, record


def text_field(
    record: dict[str, Any], key: str, path: Path, line: int, report: BadRowReport, unit: str = "line"
) -> str | None:
    """``record[key]`` if it is a non-empty string, else None with the bad row reported."""
    if key not in record or record[key] is None:
        report.add(str(path), line, f"missing field {key!r}", unit=unit)
        return None
    value = record[key]
    if not isinstance(value, str):
        report.add(str(path), line, f"field {key!r} is not a string", type(value).__name__, unit=unit)
        return None
    if not value.strip():
        report.add(str(path), line, f"empty field {key!r}", unit=unit)
        return None
    return value


def iter_text_documents(files: Iterable[Path], report: BadRowReport, text_key: str = "text") -> Iterator[str]:
    """Every document of the corpus files in order (see the module docstring for the formats)."""
    for path in files:
        if path.suffix == ".txt":
            yield from _txt_paragraphs(path, report)
        elif path.suffix == ".jsonl":
            for line_no, record in iter_jsonl(path, report):
                text = text_field(record, text_key, path, line_no, report)
                if text is not None:
                    yield text
        elif path.suffix == ".parquet":
            yield from _parquet_texts(path, report, text_key)
        else:
            raise NxdtError(f"{path}: unsupported file type {path.suffix!r}")


def _txt_paragraphs(path: Path, report: BadRowReport) -> Iterator[str]:
    paragraph: list[str] = []
    for _, line in text_lines(path):
        if line.strip():
            paragraph.append(line.rstrip("\n"))
        elif paragraph:
            report.count_read(str(path))
            yield "\n".join(paragraph)
            paragraph = []
    if paragraph:
        report.count_read(str(path))
        yield "\n".join(paragraph)


def _parquet_texts(path: Path, report: BadRowReport, text_key: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(path)
    if text_key not in parquet.schema_arrow.names:
        raise NxdtError(f"{path}: no column {text_key!r} (columns: {parquet.schema_arrow.names})")
    row = 0
    for batch in parquet.iter_batches(columns=[text_key]):
        for value in batch.column(0).to_pylist():
            row += 1
            report.count_read(str(path))
            text = text_field({text_key: value}, text_key, path, row, report, unit="row")
            if text is not None:
                yield text


def load_saved_split(path: Path, split: str) -> Any:
    """One split of a ``datasets.save_to_disk`` directory (a saved Dataset is its own only split)."""
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except FileNotFoundError as err:
        raise NxdtError(f"{path} is not a datasets.save_to_disk directory: {err}") from None
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise NxdtError(f"{path}: no split {split!r} (splits: {list(loaded)})")
        loaded = loaded[split]
    return loaded
