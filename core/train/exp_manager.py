"""Experiment management (NxDT ``exp_manager`` keys): the run directory, TensorBoard, metrics.jsonl."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch.distributed as dist

DEFAULT_EXP_DIR = "nxdt_experiments"


def run_directory(cfg: Any, is_distributed: bool) -> Path:
    """``explicit_log_dir``, else ``exp_dir/name/version``; every rank gets rank 0's answer.

    Without an explicit version, a run that may resume (``resume_if_exists``) uses a fixed
    directory so that re-running the same command finds its checkpoints; otherwise a timestamp.
    """
    em = cfg.exp_manager
    if em.explicit_log_dir:
        path = Path(em.explicit_log_dir)
    else:
        exp_dir = Path(em.exp_dir or DEFAULT_EXP_DIR)
        name = em.name or cfg.name or "default"
        version = getattr(em, "version", None) or ("run" if em.resume_if_exists else time.strftime("%Y-%m-%d_%H-%M-%S"))
        path = exp_dir / name / str(version)
    if is_distributed:
        box = [str(path)]
        dist.broadcast_object_list(box, src=0)
        path = Path(box[0])
    return path


class MetricsLogger:
    """Writes every logged step to metrics.jsonl and to TensorBoard event files (rank 0 only)."""

    def __init__(self, log_dir: Path, enabled: bool, tensorboard: bool = True):
        self.enabled = enabled
        self.log_dir = log_dir
        self._writer = None
        self._jsonl = None
        if not enabled:
            return
        log_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(log_dir / "metrics.jsonl", "a", encoding="utf-8")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(log_dir / "tensorboard"))

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """Record ``metrics`` at ``step``."""
        if not self.enabled:
            return
        record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        assert self._jsonl is not None
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._writer.add_scalar(key, value, step)

    def close(self) -> None:
        """Flush and close the files."""
        if self._writer is not None:
            self._writer.close()
        if self._jsonl is not None:
            self._jsonl.close()


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    return value
