"""Experiment management (NxDT ``exp_manager`` keys): the run directory, its lock and run id, metrics.jsonl.

- The run directory is locked while a run uses it (``nxdt.lock``, held with ``flock`` by rank 0
  and naming its host and pid): a second run on the same directory fails with one line; a lock
  left by a run that died is taken over with a warning.
- ``nxdt_run_id`` in the run directory identifies the run across re-runs of the same command; every
  checkpoint records it, and retention and auto-resume act only on the run's own checkpoints.
- metrics.jsonl gets one ``write`` per line, and a line that could not be written whole is cut
  back off, so the file always parses; after a resume the rows past the resumed step are dropped,
  so every step appears once.
- console.log gets what rank 0 prints (stdout and stderr, colour codes and redrawn progress bars
  left out) from the moment it takes the run directory to the end of the process.
- A run directory this process created and that holds nothing of the run when its lock is
  released (no metrics row, no checkpoint, no result: the run failed before its first step) is
  removed, so failed starts leave no empty run directories behind.
"""

from __future__ import annotations

import atexit
import errno
import fcntl
import json
import os
import re
import shutil
import socket
import sys
import time
import uuid
from pathlib import Path
from typing import IO, Any

import torch.distributed as dist

from nxdt.errors import NxdtError

DEFAULT_EXP_DIR = "nxdt_experiments"
LOCK_FILE = "nxdt.lock"
RUN_ID_FILE = "nxdt_run_id"
CONSOLE_LOG = "console.log"
_RUN_ID = re.compile(r"[0-9a-zA-Z_-]{1,64}")
_held: dict[str, int] = {}  # resolved run directory -> the locked file's descriptor
_created: dict[str, Path] = {}  # resolved run directory this process created -> the topmost directory it created
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def run_directory(cfg: Any, is_distributed: bool) -> Path:
    """``explicit_log_dir``, else ``exp_dir/name/version``, locked for this run; every rank gets rank 0's answer.

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
    rank = dist.get_rank() if is_distributed else 0
    error = None
    if rank == 0:
        try:
            acquire_run_lock(path)
        except NxdtError as exc:
            error = str(exc)
    if is_distributed:
        box = [(str(path), error)]
        dist.broadcast_object_list(box, src=0)
        path, error = Path(box[0][0]), box[0][1]
    if error:
        raise NxdtError(error)
    if rank == 0:
        start_console_log(path)
    return path


# -- the console log ------------------------------------------------------------------------------
class _Tee:
    """A text stream that also appends complete lines, without colour codes or bar redraws, to a log file."""

    def __init__(self, stream: Any, log: IO[str]) -> None:
        self.stream, self.log, self._partial = stream, log, ""

    def write(self, text: str) -> int:
        """Write to the stream; log each finished line (the text after its last carriage return)."""
        written = self.stream.write(text)
        self._partial += text
        if "\n" in self._partial:
            *lines, self._partial = self._partial.split("\n")
            try:
                self.log.write("".join(_ANSI.sub("", line.rsplit("\r", 1)[-1]) + "\n" for line in lines))
                self.log.flush()
            except (OSError, ValueError):
                pass  # a full disk or a closed log must not stop the run's own output
        return written

    def flush(self) -> None:
        """Flush the stream."""
        self.stream.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)  # isatty, fileno, encoding: the terminal's, for rich


_console: dict[str, Any] = {}


def start_console_log(run_dir: Path) -> None:
    """Copy this process's stdout and stderr lines to ``run_dir/console.log`` until :func:`stop_console_log`.

    The log outlives the run lock (the final metrics are printed after the last checkpoint
    released it) and ends at exit or when another run starts in this process.
    """
    if _console.get("dir") == str(Path(run_dir).resolve()):
        return
    stop_console_log()
    try:
        log = open(Path(run_dir) / CONSOLE_LOG, "a", encoding="utf-8")  # noqa: SIM115 - closed by stop_console_log
    except OSError:
        return
    _console.update(log=log, stdout=sys.stdout, stderr=sys.stderr, dir=str(Path(run_dir).resolve()))
    sys.stdout, sys.stderr = _Tee(sys.stdout, log), _Tee(sys.stderr, log)  # type: ignore[assignment]


def stop_console_log() -> None:
    """Put the original streams back (where nobody replaced them since) and close the log."""
    if not _console:
        return
    for name in ("stdout", "stderr"):
        current = getattr(sys, name)
        if isinstance(current, _Tee) and current.log is _console["log"]:
            setattr(sys, name, _console[name])
    _console["log"].close()
    _console.clear()


# -- the run lock ---------------------------------------------------------------------------------
def _process_start(pid: int) -> str | None:
    """The start time of process ``pid`` (clock ticks since boot), which a reused pid does not share."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _describe(holder: dict[str, Any]) -> str:
    started = holder.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, int | float) else "?"
    return f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, since {when}"


def _read_holder(fd: int) -> dict[str, Any]:
    os.lseek(fd, 0, os.SEEK_SET)
    try:
        holder = json.loads(os.read(fd, 4096).decode("utf-8", "replace") or "{}")
    except json.JSONDecodeError:
        return {}
    return holder if isinstance(holder, dict) else {}


def acquire_run_lock(run_dir: str | Path) -> None:
    """Lock ``run_dir`` for this process, or raise one line naming the run that holds it.

    ``flock`` is released by the kernel when its holder dies, so a lock file left behind by a dead
    run is taken over (with a warning naming it). Locking again from the same process is a no-op.
    """
    run_dir = Path(run_dir)
    key = str(run_dir.resolve())
    if key in _held:
        return
    top = run_dir.resolve()
    while not top.parent.exists():
        top = top.parent
    existed = top.exists()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise NxdtError(f"cannot create the run directory {run_dir}: {exc.strerror or exc}") from None
    path = run_dir / LOCK_FILE
    for _ in range(5):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _read_holder(fd)
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise NxdtError(f"cannot lock the run directory {run_dir}: {exc.strerror}") from None
            raise NxdtError(f"run directory {run_dir} is in use by another run ({_describe(holder)}); wait for it "
                            f"to finish, or give this run another exp_manager.explicit_log_dir or version") from None
        try:
            same_file = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same_file = False
        if not same_file:  # the previous holder removed the file between our open and flock
            os.close(fd)
            continue
        previous = _read_holder(fd)
        if previous.get("pid") is not None:
            print(f"nxdt: warning: taking over the run lock of {run_dir} left by a run that is gone "
                  f"({_describe(previous)})", file=sys.stderr, flush=True)
        me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(),
              "process_start": _process_start(os.getpid())}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        os.fsync(fd)
        _held[key] = fd
        if not existed:
            _created[key] = top
        return
    raise NxdtError(f"cannot lock the run directory {run_dir}: it keeps changing")


def release_run_lock(run_dir: str | Path) -> None:
    """Release this process's lock of ``run_dir`` (and remove the lock file); no-op when not held."""
    key = str(Path(run_dir).resolve())
    fd = _held.pop(key, None)
    if fd is None:
        return
    if key in _created and not holds_run_output(Path(run_dir)):
        if _console.get("dir") == key:
            stop_console_log()
        top = _created.pop(key)
        shutil.rmtree(run_dir, ignore_errors=True)  # while still locked: nobody else starts in it meanwhile
        os.close(fd)
        parent = Path(key).parent
        while parent != top.parent and parent.is_relative_to(top):  # the empty parents it created (exp_dir/name)
            try:
                parent.rmdir()
            except OSError:
                break  # not empty: another run's
            parent = parent.parent
        return
    try:
        os.unlink(Path(run_dir) / LOCK_FILE)  # while still locked, so nobody locks the removed file for long
    except OSError:
        pass
    os.close(fd)


def holds_run_output(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds anything of a run: a metrics row, a checkpoint or a result."""
    metrics = run_dir / "metrics.jsonl"
    if (metrics.is_file() and metrics.stat().st_size > 0) or (run_dir / "result.json").exists():
        return True
    checkpoints = run_dir / "checkpoints"
    return checkpoints.is_dir() and any(checkpoints.iterdir())


@atexit.register
def _release_all() -> None:
    stop_console_log()
    for key in list(_held):
        release_run_lock(key)


def run_id(run_dir: str | Path) -> str:
    """The id of the run using ``run_dir``: read from ``nxdt_run_id``, created there the first time."""
    path = Path(run_dir) / RUN_ID_FILE
    try:
        text = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        text = ""
    except (OSError, UnicodeDecodeError) as exc:
        raise NxdtError(f"cannot read the run id {path}: {exc}") from None
    if text:
        if not _RUN_ID.fullmatch(text):
            raise NxdtError(f"{path} holds {text[:40]!r}, not a run id; delete it to start a new run there")
        return text
    new = uuid.uuid4().hex[:16]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{RUN_ID_FILE}.tmp{os.getpid()}")
        tmp.write_text(new + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:
        raise NxdtError(f"cannot write the run id {path}: {exc.strerror or exc}") from None
    return new


# -- metrics ----------------------------------------------------------------------------------------
class MetricsLogger:
    """Writes every logged step to metrics.jsonl and to TensorBoard event files (rank 0 only)."""

    def __init__(self, log_dir: Path, enabled: bool, tensorboard: bool = True):
        self.enabled = enabled
        self.log_dir = log_dir
        self.path = Path(log_dir) / "metrics.jsonl"
        self._writer = None
        self._fd: int | None = None
        if not enabled:
            return
        log_dir.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._cut_partial_line()
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(log_dir / "tensorboard"))

    def _cut_partial_line(self) -> None:
        """Remove a last line without its newline (a process killed mid-write), so the file parses."""
        assert self._fd is not None
        size = os.fstat(self._fd).st_size
        if size == 0:
            return
        with open(self.path, "rb") as f:
            f.seek(max(0, size - (1 << 20)))
            tail = f.read()
        if tail.endswith(b"\n"):
            return
        cut = tail.rfind(b"\n")
        os.ftruncate(self._fd, size - len(tail) + cut + 1 if cut >= 0 else max(0, size - len(tail)))

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """Record ``metrics`` at ``step``: one write of one whole line, or none at all."""
        if not self.enabled:
            return
        record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        assert self._fd is not None
        data = (json.dumps(record) + "\n").encode()
        before = os.fstat(self._fd).st_size
        try:
            written = os.write(self._fd, data)
            if written != len(data):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError as exc:
            try:
                os.ftruncate(self._fd, before)
            except OSError:
                pass
            reason = "no space left on device" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else exc.strerror
            raise NxdtError(f"cannot write {self.path}: {reason} (in {self.log_dir}); the file keeps its whole "
                            "lines") from None
        if self._writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._writer.add_scalar(key, value, step)

    def rewind(self, step: int) -> None:
        """Drop the rows logged after ``step`` (a resumed run logs those steps again)."""
        if not self.enabled or self._fd is None:
            return
        lines = self.path.read_bytes().splitlines(keepends=True)
        kept = [line for line in lines if _row_step(line) is not None and _row_step(line) <= step]  # type: ignore[operator]
        if len(kept) == len(lines):
            return
        tmp = self.path.with_name(f"metrics.jsonl.tmp{os.getpid()}")
        tmp.write_bytes(b"".join(kept))
        os.replace(tmp, self.path)
        os.close(self._fd)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def close(self) -> None:
        """Flush and close the files."""
        if self._writer is not None:
            self._writer.close()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _row_step(line: bytes) -> int | None:
    try:
        row = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    step = row.get("step") if isinstance(row, dict) else None
    return step if isinstance(step, int) else None


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    return value
