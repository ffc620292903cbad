"""Checkpoint names, the completion marker, ownership, listing and keep-last-K retention.

A checkpoint is a directory under the checkpoint root. It counts as complete only when its
marker (``nxdt_checkpoint.json``) exists and is valid: rank 0 writes the marker last, after every
rank's shards are written, and the marker lists every file with its size and SHA-256, so a load
can tell a missing or damaged shard by name. Directories without a valid marker are saves that
died half-way (or one in flight) and are never resumed from; a malformed marker is reported
once as a warning and its checkpoint skipped.

Every save first writes ``nxdt_owner.json`` with the id of the run writing it, and the marker
repeats it. Retention and auto-resume act only on the run's own checkpoints, so a shared
``checkpoint_dir`` (other runs, user files) is never touched.
"""

from __future__ import annotations

import json
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from nxdt.checkpoint.names import render
from nxdt.checkpoint.safe_read import is_plain_file_name
from nxdt.checkpoint.store import Store
from nxdt.errors import NxdtError

MARKER = "nxdt_checkpoint.json"
CONFIG_FILE = "nxdt_config.yaml"
#: written first by every save: the run that owns the directory, so a save that died is known as ours
OWNER_FILE = "nxdt_owner.json"
METADATA_FILE = ".metadata"
FORMAT = "nxdt-dcp-1"
_SHA256 = re.compile(r"[0-9a-f]{64}")
_warned: set[tuple[str, str]] = set()


def checkpoint_name(template: str | None, values: dict[str, Any]) -> str:
    """A checkpoint directory name from an NxDT/Lightning ``filename`` template.

    As in Lightning, ``{step}`` becomes ``step=12``; a format spec is honoured (``{step:05d}``).
    """
    return render(template, values)


@dataclass
class CheckpointInfo:
    """One checkpoint directory as listed: its marker (when complete), owner and bytes."""

    name: str
    complete: bool
    step: int | None = None
    consumed_samples: int | None = None
    size_bytes: int = 0
    marker: dict[str, Any] = field(default_factory=dict)
    run_id: str | None = None
    #: why a marker that exists was not accepted (the checkpoint then counts as incomplete)
    problem: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """A JSON-friendly summary (the file list left out)."""
        keep = ("world_size", "layout", "created", "async")
        extra = {"problem": self.problem} if self.problem else {}
        return {"name": self.name, "complete": self.complete, "step": self.step,
                "consumed_samples": self.consumed_samples, "size_bytes": self.size_bytes, "run_id": self.run_id,
                **{k: self.marker[k] for k in keep if k in self.marker}, **extra}


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def marker_problem(marker: Any) -> str | None:
    """What makes ``marker`` (parsed JSON) unusable as a completion marker, or None when it is valid."""
    if not isinstance(marker, dict):
        return "the marker is not a JSON object"
    if marker.get("format") != FORMAT:
        return f"the marker's format is {marker.get('format')!r}, not {FORMAT!r}"
    for key in ("step", "consumed_samples"):
        if not _is_count(marker.get(key)):
            return f"the marker's {key} is {marker.get(key)!r}, not a non-negative integer"
    files = marker.get("files")
    if not isinstance(files, dict) or not files:
        return "the marker lists no files"
    if METADATA_FILE not in files:
        return f"the marker does not list {METADATA_FILE}"
    for rel, entry in files.items():
        if not isinstance(rel, str) or not is_plain_file_name(rel) or rel == MARKER:
            return f"the marker lists {rel!r}, which is not a file of the checkpoint"
        if not isinstance(entry, dict) or not _is_count(entry.get("size")):
            return f"the marker's entry for {rel!r} has no valid size"
        if not isinstance(entry.get("sha256"), str) or not _SHA256.fullmatch(entry["sha256"]):
            return f"the marker's entry for {rel!r} has no valid sha256"
    if "has_optimizer" in marker and not isinstance(marker["has_optimizer"], bool):
        return "the marker's has_optimizer is not a boolean"
    if "run_id" in marker and not isinstance(marker["run_id"], str):
        return "the marker's run_id is not a string"
    return None


def inspect_marker(store: Store, name: str) -> tuple[dict[str, Any] | None, str | None]:
    """(the valid marker of checkpoint ``name`` or None, why an existing marker is not valid or None)."""
    text = store.read_text(name, MARKER)
    if text is None:
        return None, None
    try:
        marker = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        return None, f"the marker is not valid JSON ({exc.__class__.__name__})"
    problem = marker_problem(marker)
    return (None, problem) if problem else (marker, None)


def warn_once(message: str, key: str = "") -> None:
    """Print ``nxdt: warning: message`` on stderr, once per process for each (key, message)."""
    if (key, message) in _warned:
        return
    _warned.add((key, message))
    print(f"nxdt: warning: {message}", file=sys.stderr, flush=True)


def read_marker(store: Store, name: str) -> dict[str, Any] | None:
    """The valid marker of checkpoint ``name``; None when absent or malformed (then with a warning)."""
    marker, problem = inspect_marker(store, name)
    if problem:
        warn_once(f"checkpoint {store.url(name)} is skipped as incomplete: {problem}")
    return marker


def write_marker(store: Store, name: str, marker: dict[str, Any]) -> None:
    """Publish checkpoint ``name`` as complete (the last write of a save)."""
    store.write_text(json.dumps({"format": FORMAT, **marker}, indent=1, sort_keys=True), name, MARKER)


def write_owner(store: Store, name: str, run_id: str, step: int) -> None:
    """Record that ``run_id`` is writing checkpoint ``name`` (the first write of a save)."""
    store.write_text(json.dumps({"run_id": run_id, "step": step, "created": time.time()}), name, OWNER_FILE)


def read_owner(store: Store, name: str) -> str | None:
    """The run id that started writing checkpoint ``name``, or None when unknown."""
    try:
        owner = json.loads(store.read_text(name, OWNER_FILE) or "null")
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        return None
    run_id = owner.get("run_id") if isinstance(owner, dict) else None
    return run_id if isinstance(run_id, str) else None


def list_checkpoints(store: Store, with_sizes: bool = True) -> list[CheckpointInfo]:
    """Every checkpoint directory under ``store``: complete ones by step, then incomplete ones.

    A malformed marker makes its checkpoint incomplete, with a warning; it never fails the listing.
    """
    infos = []
    for name in store.list_dirs():
        marker, problem = inspect_marker(store, name)
        if problem:
            warn_once(f"checkpoint {store.url(name)} is skipped as incomplete: {problem}")
        if marker is None:
            size = sum(store.files(name).values()) if with_sizes else 0
            infos.append(CheckpointInfo(name, complete=False, size_bytes=size, run_id=read_owner(store, name),
                                        problem=problem))
            continue
        size = sum(f["size"] for f in marker["files"].values()) + (store.size(name, MARKER) or 0)
        infos.append(CheckpointInfo(name, True, marker["step"], marker["consumed_samples"], size, marker,
                                    run_id=marker.get("run_id")))
    infos.sort(key=lambda i: (not i.complete, i.step if i.step is not None else -1, i.name))
    return infos


def latest_complete(store: Store, run_id: str | None = None) -> CheckpointInfo | None:
    """The complete checkpoint with the highest step, of run ``run_id`` only when given."""
    complete = [i for i in list_checkpoints(store, with_sizes=False)
                if i.complete and (run_id is None or i.run_id == run_id)]
    return complete[-1] if complete else None


def retention_victims(infos: list[CheckpointInfo], keep: int, monitor: str = "step", mode: str = "max",
                      run_id: str | None = None, pattern: re.Pattern[str] | None = None) -> list[str]:
    """Checkpoints to delete so that the best ``keep`` complete ones remain (``keep < 0``: keep all).

    Only checkpoints of run ``run_id`` whose name ``pattern`` matches are considered: another run's
    checkpoints and anything else in the directory are never touched. The run's incomplete
    directories (saves that died) go too; saves are serialized, so none of them is in flight.
    """
    if monitor not in ("step", "consumed_samples"):
        raise NxdtError(f"checkpoint_callback_params.monitor={monitor!r} is not supported; use 'step' or 'consumed_samples'")
    mine = [i for i in infos if i.run_id is not None and i.run_id == run_id
            and (pattern is None or pattern.match(i.name))]
    complete = [i for i in mine if i.complete]
    complete.sort(key=lambda i: getattr(i, monitor), reverse=(mode == "max"))
    victims = [i.name for i in complete[keep:]] if keep >= 0 else []
    return victims + [i.name for i in mine if not i.complete]


def remove_checkpoint(store: Store, name: str) -> None:
    """Delete checkpoint ``name``: its marker first (so it stops counting as complete), then the data."""
    store.remove(name, first=MARKER)


def unlisted_files(store: Store, name: str, marker: dict[str, Any]) -> list[str]:
    """Problems with files DCP or export would read that the marker does not list (so nothing verifies them)."""
    listed = marker.get("files", {})
    return [f"checkpoint file not covered by its marker: {store.url(name, rel)}"
            for rel in sorted(store.files(name))
            if rel not in listed and (rel.endswith(".distcp") or rel in (METADATA_FILE, CONFIG_FILE))]


def verify_files(store: Store, name: str, marker: dict[str, Any], only: list[str] | None = None) -> list[str]:
    """Problems (one line each, naming the file) with the files the marker lists; [] when all match."""
    problems = []
    files = marker.get("files", {})
    if only is None:
        problems += unlisted_files(store, name, marker)
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
