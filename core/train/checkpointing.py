"""Checkpoint hooks of the trainer. Until sharded checkpoints land, runs neither save nor resume."""

from __future__ import annotations

from typing import Any


class NoCheckpointing:
    """The trainer's checkpoint interface for runs without checkpointing."""

    def maybe_resume(self) -> None:
        """Resume from the latest complete checkpoint when asked (nothing to resume here)."""

    def maybe_save(self, final: bool = False) -> None:
        """Save when the schedule says so (never here)."""

    def close(self) -> None:
        """Wait for pending saves (none here)."""


def build_checkpointer(trainer: Any) -> NoCheckpointing:
    """The checkpointer for ``trainer``'s exp_manager settings."""
    return NoCheckpointing()
