"""Counting and reporting the rows of a data file that cannot be used.

A bad row never crashes a run and is never dropped silently: it is skipped, counted under its
reason and reported with its file and 1-based line (or row) number. A file whose share of bad rows
exceeds ``max_bad_fraction`` is almost certainly in the wrong format, so that raises instead.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

from nxdt.errors import NxdtError

logger = logging.getLogger("nxdt.data")

#: How many bad rows of one file ``summary()`` spells out before it says "and N more".
SHOWN_PER_FILE = 5


@dataclass(frozen=True)
class BadRow:
    """One unusable row: where it is, the reason category, and the full message."""

    path: str
    line: int  # 1-based
    reason: str  # the category counted in ``by_reason`` (e.g. "invalid JSON")
    message: str  # what the user reads (e.g. "invalid JSON: Expecting value: ...")
    unit: str = "line"  # "line" for text files, "row" for tables (parquet, HF datasets)

    def __str__(self) -> str:
        return f"{self.unit} {self.line}: {self.message}"


class BadRowReport:
    """Bad rows per file and reason, plus the rows read per file to judge the bad fraction."""

    def __init__(self, max_bad_fraction: float = 0.5) -> None:
        self.max_bad_fraction = max_bad_fraction
        self.rows: list[BadRow] = []
        self.rows_read: Counter[str] = Counter()

    def add(
        self,
        path: str,
        line: int,
        reason: str,
        detail: str = "",
        unit: str = "line",
        message: str | None = None,
    ) -> None:
        """Record one bad row; the message is "reason: detail" unless given whole."""
        if message is None:
            message = f"{reason}: {detail}" if detail else reason
        self.rows.append(BadRow(str(path), line, reason, message, unit))

    def count_read(self, path: str, n: int = 1) -> None:
        """Count rows read from ``path`` (good and bad) for the bad-fraction check."""
        self.rows_read[str(path)] += n

    def merge(self, other: BadRowReport) -> None:
        """Fold another report (for instance a later pass over the same files) into this one."""
        self.rows.extend(other.rows)
        self.rows_read.update(other.rows_read)

    @property
    def count(self) -> int:
        """The number of bad rows over all files."""
        return len(self.rows)

    def by_reason(self) -> dict[str, int]:
        """Bad-row counts per reason category, most frequent first."""
        return dict(Counter(row.reason for row in self.rows).most_common())

    def by_file(self) -> dict[str, list[BadRow]]:
        """The bad rows grouped by file, in the order the files were read."""
        grouped: dict[str, list[BadRow]] = {}
        for row in self.rows:
            grouped.setdefault(row.path, []).append(row)
        return {path: sorted(rows, key=lambda row: row.line) for path, rows in grouped.items()}

    def summary(self) -> str:
        """One line per file, e.g. "train.jsonl: 2 bad rows skipped (line 3: invalid JSON: ...)"."""
        if not self.rows:
            return "no bad rows"
        lines = []
        for path, rows in self.by_file().items():
            shown = "; ".join(str(row) for row in rows[:SHOWN_PER_FILE])
            if len(rows) > SHOWN_PER_FILE:
                shown += f"; and {len(rows) - SHOWN_PER_FILE} more"
            noun = "bad row" if len(rows) == 1 else "bad rows"
            lines.append(f"{path}: {len(rows)} {noun} skipped ({shown})")
        return "\n".join(lines)

    def check(self) -> None:
        """Raise NxdtError naming the file whose bad fraction exceeds ``max_bad_fraction``."""
        for path, rows in self.by_file().items():
            read = max(self.rows_read[path], len(rows))
            if len(rows) / read > self.max_bad_fraction:
                reasons = ", ".join(
                    f"{reason} ({n})" for reason, n in Counter(r.reason for r in rows).most_common()
                )
                raise NxdtError(
                    f"{path}: {len(rows)} of {read} rows are bad, more than max_bad_fraction="
                    f"{self.max_bad_fraction} (is it in the expected format?): {reasons}; first: {rows[0]}"
                )

    def log(self) -> None:
        """Warn about the bad rows, if any, on the "nxdt.data" logger."""
        if self.rows:
            logger.warning("%s", self.summary())

    def __repr__(self) -> str:
        return f"BadRowReport(count={self.count}, by_reason={self.by_reason()})"
