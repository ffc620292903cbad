"""One training process: what `nxdt run` executes in-process or in each torchrun worker.

Under `nxdt run`'s launcher (``NXDT_STATUS_DIR`` set) a worker:

- dies with the launcher: the kernel sends it SIGKILL when the launcher process goes
  (``PR_SET_PDEATHSIG``), so killing only `nxdt run` leaves no worker training and saving;
- writes a heartbeat (rank, pid, step, time) to ``rank<R>.json`` every second from a thread, which
  a stopped or frozen process stops doing, so the launcher can tell which rank is stuck;
- reports its error to ``rank<R>.error.json`` (message, exit code, time, and whether it is only a
  consequence of another rank's failure, such as a collective timing out) and prints nothing: the
  launcher prints the one line that names the failing rank.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from nxdt.errors import NxdtError

STATUS_DIR_ENV = "NXDT_STATUS_DIR"
LAUNCHER_PID_ENV = "NXDT_LAUNCHER_PID"
HEARTBEAT_S = 1.0
_PR_SET_PDEATHSIG = 1


def train(argv: Sequence[str], on_trainer: Callable[[Any], None] | None = None):
    """Resolve the run from ``argv`` (target, --recipe, overrides), join the world and train."""
    from nxdt.parallel.world import init_world, shutdown
    from nxdt.resolve import resolve
    from nxdt.train.trainer import Trainer

    parser = argparse.ArgumentParser(prog="nxdt-worker")
    parser.add_argument("target")
    parser.add_argument("--recipe")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(list(argv))
    resolved = resolve(args.target, args.recipe, args.overrides)
    world = init_world(timeout_s=resolved.config.distributed_strategy.collective_timeout_s)
    trainer = None
    try:
        trainer = Trainer(resolved, world)
        if on_trainer is not None:
            on_trainer(trainer)
        result = trainer.fit()
        if world.is_main:
            summary = {"run_dir": result.run_dir, "final_loss": result.losses[-1] if result.losses else None,
                       "val_losses": result.val_losses, **result.metrics}
            with open(os.path.join(result.run_dir, "result.json"), "w") as f:
                json.dump(summary, f, indent=2)
        return result
    finally:
        from nxdt.train.exp_manager import release_run_lock

        if world.is_main and trainer is not None:
            release_run_lock(trainer.run_dir)
        shutdown(world)


def die_with_launcher() -> None:
    """Ask the kernel to SIGKILL this process when the `nxdt run` launcher dies (Linux; no-op elsewhere)."""
    launcher = os.environ.get(LAUNCHER_PID_ENV)
    if not launcher or not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != int(launcher):  # the launcher died before prctl took effect
        os._exit(1)


class WorkerStatus:
    """This worker's heartbeat and error report in the launcher's status directory."""

    def __init__(self, directory: str, rank: int):
        self.directory, self.rank = directory, rank
        self.step: Callable[[], int | None] = lambda: None
        self._stop = threading.Event()

    def _write(self, name: str, record: dict[str, Any]) -> None:
        path = os.path.join(self.directory, name)
        tmp = f"{path}.tmp"
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(record, f)
            os.replace(tmp, path)
        except OSError:
            pass  # a heartbeat that cannot be written is the launcher's problem to notice

    def beat(self) -> None:
        """Write one heartbeat."""
        try:
            step = self.step()
        except Exception:
            step = None
        self._write(f"rank{self.rank}.json", {"rank": self.rank, "pid": os.getpid(), "host": socket.gethostname(),
                                              "time": time.time(), "step": step})

    def start(self) -> None:
        """Beat every HEARTBEAT_S seconds from a daemon thread."""
        def loop() -> None:
            while not self._stop.wait(HEARTBEAT_S):
                self.beat()

        try:  # a report left by this rank's previous attempt (torchrun --max-restarts) is not about this one
            os.remove(os.path.join(self.directory, f"rank{self.rank}.error.json"))
        except OSError:
            pass
        self.beat()
        threading.Thread(target=loop, daemon=True, name="nxdt-heartbeat").start()

    def finish(self) -> None:
        """Stop beating and remove the heartbeat: a worker that ended normally is not silent."""
        self._stop.set()
        try:
            os.remove(os.path.join(self.directory, f"rank{self.rank}.json"))
        except OSError:
            pass

    def report(self, message: str, exit_code: int, secondary: bool) -> None:
        """Record this worker's error for the launcher."""
        self._stop.set()
        self._write(f"rank{self.rank}.error.json", {"rank": self.rank, "pid": os.getpid(), "time": time.time(),
                                                    "message": message, "exit_code": exit_code,
                                                    "secondary": secondary})


def describe_exception(exc: BaseException) -> tuple[str, bool]:
    """(one line for ``exc``, whether it is only a consequence of another rank failing)."""
    text = str(exc).strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    lowered = text.lower()
    if isinstance(exc, NxdtError):
        return str(exc), False
    if "timed out" in lowered or "timeout" in lowered:
        from nxdt.parallel.world import configured_timeout

        return (f"a collective timed out after {configured_timeout():g} s "
                f"(distributed_strategy.collective_timeout_s) waiting for another rank"), True
    if any(s in lowered for s in ("connection closed by peer", "connection reset", "broken pipe",
                                  "connection refused", "socket closed")):
        return "lost the connection to another rank (it stopped or died)", True
    return f"internal error: {type(exc).__name__}: {first} (run with --debug for the traceback)", False


def main() -> int:
    """Worker entry point under torchrun: user errors become one line and a non-zero exit."""
    die_with_launcher()
    rank = int(os.environ.get("RANK", 0))
    directory = os.environ.get(STATUS_DIR_ENV)
    status = WorkerStatus(directory, rank) if directory and os.path.isdir(directory) else None
    if status is not None:
        status.start()

    def watch(trainer: Any) -> None:
        if status is not None:
            status.step = lambda: trainer.state.step

    try:
        train(sys.argv[1:], on_trainer=watch)
    except KeyboardInterrupt:
        if status is not None:
            status.report("interrupted", 130, secondary=True)
        return 130
    except BaseException as exc:
        if isinstance(exc, SystemExit) or os.environ.get("NXDT_DEBUG"):
            raise
        message, secondary = describe_exception(exc)
        code = exc.exit_code if isinstance(exc, NxdtError) else 1
        if status is not None:
            status.report(message, code, secondary)
        elif rank == 0:
            print(f"nxdt: error: {message}", file=sys.stderr)
        return code
    if status is not None:
        status.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
