"""The rank-0 progress display: a rich bar on a terminal, one line per log step otherwise."""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


class ProgressReporter:
    """Shows step, loss, lr, grad norm, tokens/s, MFU (when the peak is known) and the ETA."""

    def __init__(self, total_steps: int, start_step: int, enabled: bool, console: Console | None = None):
        self.enabled = enabled
        # soft_wrap: a long line stays one line when piped (rich would hard-wrap it at 80 columns)
        self.console = console or Console(stderr=False, soft_wrap=True)
        self.total = total_steps
        self._progress: Progress | None = None
        self._task = None
        self._t0 = time.perf_counter()
        self._start = start_step
        if enabled and self.console.is_terminal:
            self._progress = Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[stats]}"),
                TimeRemainingColumn(),
                console=self.console,
                transient=False,
            )
            self._task = self._progress.add_task("train", total=total_steps, completed=start_step, stats="")
            self._progress.start()

    def update(self, step: int, metrics: dict[str, Any], log_line: bool) -> None:
        """Advance to ``step``; print a line when ``log_line`` and there is no live bar."""
        if not self.enabled:
            return
        stats = _format(metrics)
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, completed=step, stats=stats)
        elif log_line:
            done = step - self._start
            elapsed = time.perf_counter() - self._t0
            eta = elapsed / done * (self.total - step) if done else 0.0
            self.console.print(f"step {step}/{self.total} {stats} eta={eta:.0f}s", highlight=False)

    def print(self, message: str) -> None:
        """Print a message above the bar (rank 0 only)."""
        if self.enabled:
            self.console.print(message, highlight=False)

    def close(self) -> None:
        """Stop the live bar."""
        if self._progress is not None:
            self._progress.stop()


def _format(m: dict[str, Any]) -> str:
    parts = []
    for key, label, fmt in (
        ("loss", "loss", "{:.4f}"),
        ("lr", "lr", "{:.2e}"),
        ("grad_norm", "gnorm", "{:.3f}"),
        ("tokens_per_s", "tok/s", "{:,.0f}"),
        ("mfu", "mfu", "{:.1%}"),
        ("val_loss", "val", "{:.4f}"),
    ):
        if m.get(key) is not None:
            parts.append(f"{label}={fmt.format(m[key])}")
    return " ".join(parts)
