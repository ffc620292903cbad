"""Checkpoint names, the completion marker, listing and keep-last-K retention.

A checkpoint is a directory under the checkpoint root. It counts as complete only when its
marker (``nxdt_checkpoint.json``) exists: rank 0 writes the marker last, after every rank's
shards are written, and the marker lists every file with its size and SHA-256, so a load can
tell a missing or damaged shard by name. Directories without a marker are saves that died
half-way (or one in flight) and are never resumed from.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from nxdt.checkpoint.store import Store
from nxdt.errors import NxdtError

MARKER = "nxdt_checkpoint.json"
CONFIG_FILE = "nxdt_config.yaml"
FORMAT = "nxdt-dcp-1"
DEFAULT_FILENAME = "nxdt--{step}-{consumed_samples}"
_FIELD = re.compile(r"\{(\w+)(?::([^}]*))?\}")


def checkpoint_name(template: str | None, values: dict[str, Any]) -> str:
    """A checkpoint directory name from an NxDT/Lightning ``filename`` template.

    As in Lightning, ``{step}`` becomes ``step=12``; a format spec is honoured (``{step:05d}``).
    """

    def sub(m: re.Match) -> str:
        key, spec = m.group(1), m.group(2) or ""
        if key not in values:
            raise NxdtError(
                f"checkpoint_callback_params.filename uses {{{key}}}; available: {', '.join('{' + k + '}' for k in values)}"
            )
        return f"{key}={format(values[key], spec)}"

    name = _FIELD.sub(sub, template or DEFAULT_FILENAME)
    if "/" in name or not name.strip("."):
        raise NxdtError(f"checkpoint_callback_params.filename gives an invalid directory name: {name!r}")
    return name


@dataclass
class CheckpointInfo:
    """One checkpoint directory as listed: its marker (when complete) and its bytes."""

    name: str
    complete: bool
    step: int | None = None
    consumed_samples: int | None = None
    size_bytes: int = 0
    marker: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """A JSON-friendly summary (the file list left out)."""
        keep = ("world_size", "layout", "created", "async")
        return {"name": self.name, "complete": self.complete, "step": self.step,
                "consumed_samples": self.consumed_samples, "size_bytes": self.size_bytes,
                **{k: self.marker[k] for k in keep if k in self.marker}}


def read_marker(store: Store, name: str) -> dict[str, Any] | None:
    """The parsed marker of checkpoint ``name``, or None when it is absent or unreadable."""
    text = store.read_text(name, MARKER)
    if text is None:
        return None
    try:
        marker = json.loads(text)
    except json.JSONDecodeError:
        return None
    return marker if isinstance(marker, dict) and marker.get("format") == FORMAT else None


def write_marker(store: Store, name: str, marker: dict[str, Any]) -> None:
    """Publish checkpoint ``name`` as complete (the last write of a save)."""
    store.write_text(json.dumps({"format": FORMAT, **marker}, indent=1, sort_keys=True), name, MARKER)


def list_checkpoints(store: Store, with_sizes: bool = True) -> list[CheckpointInfo]:
    """Every checkpoint directory under ``store``: complete ones by step, then incomplete ones."""
    infos = []
    for name in store.list_dirs():
        marker = read_marker(store, name)
        if marker is None:
            size = sum(store.files(name).values()) if with_sizes else 0
            infos.append(CheckpointInfo(name, complete=False, size_bytes=size))
            continue
        size = sum(f["size"] for f in marker["files"].values()) + (store.size(name, MARKER) or 0)
        infos.append(CheckpointInfo(name, True, int(marker["step"]), int(marker["consumed_samples"]), size, marker))
    infos.sort(key=lambda i: (not i.complete, i.step if i.step is not None else -1, i.name))
    return infos


def latest_complete(store: Store) -> CheckpointInfo | None:
    """The complete checkpoint with the highest step, if any."""
    complete = [i for i in list_checkpoints(store, with_sizes=False) if i.complete]
    return complete[-1] if complete else None


def retention_victims(infos: list[CheckpointInfo], keep: int, monitor: str = "step", mode: str = "max") -> list[str]:
    """Checkpoints to delete so that the best ``keep`` complete ones remain (``keep < 0``: keep all).

    Incomplete directories older than the newest complete checkpoint are leftovers of saves that
    died; they go too. (Saves are serialized, so none of them is in flight when this runs.)
    """
    complete = [i for i in infos if i.complete]
    if monitor not in ("step", "consumed_samples"):
        raise NxdtError(f"checkpoint_callback_params.monitor={monitor!r} is not supported; use 'step' or 'consumed_samples'")
    complete.sort(key=lambda i: getattr(i, monitor), reverse=(mode == "max"))
    victims = [i.name for i in complete[keep:]] if keep >= 0 else []
    newest = max((i.step for i in complete if i.step is not None), default=None)
    if newest is not None:
        for info in infos:
            step = _step_of_name(info.name)
            if not info.complete and step is not None and step < newest:
                victims.append(info.name)
    return victims


def _step_of_name(name: str) -> int | None:
    m = re.search(r"step=(\d+)", name)
    return int(m.group(1)) if m else None


def verify_files(store: Store, name: str, marker: dict[str, Any], only: list[str] | None = None) -> list[str]:
    """Problems (one line each, naming the file) with the files the marker lists; [] when all match."""
    problems = []
    files = marker.get("files", {})
    for rel in only if only is not None else sorted(files):
        expected = files[rel]
        size = store.size(name, rel)
        where = store.url(name, rel)
        if size is None:
            problems.append(f"checkpoint file missing: {where}")
        elif size != expected["size"]:
            problems.append(f"checkpoint file damaged: {where} has {size} bytes, the marker says {expected['size']}")
        elif store.sha256(name, rel) != expected["sha256"]:
            problems.append(f"checkpoint file damaged: {where} does not match its SHA-256 in {MARKER}")
    return problems
