"""Real `nxdt run` processes and real gloo workers against careless operators (issue 14): a fixed-name
checkpoint killed mid-save, two runs on one directory, killing only the launcher, Ctrl-C, a stopped
(SIGSTOP) rank and a dead rank under a short collective timeout."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from multirank import tiny

from nxdt.checkpoint.layout import list_checkpoints
from nxdt.checkpoint.store import Store

pytestmark = pytest.mark.slow
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "NXDT_DEVICE": "cpu"}
LONG = 100_000  # steps: these runs end by signal or failure


def command(run_dir: Path, data: list[str], *extra: str, nproc: int = 2, steps: int = LONG) -> list[str]:
    """`nxdt run llama3-tiny` on the tiny shape, logging every step into ``run_dir``."""
    return [sys.executable, "-m", "nxdt.cli.main", "run", "llama3-tiny", "--nproc-per-node", str(nproc),
            *tiny(2, steps, "trainer.log_every_n_steps=1", "exp_manager.create_tensorboard_logger=false"), *data,
            f"exp_manager.explicit_log_dir={run_dir}", *extra]


class Job:
    """A background `nxdt run` in its own session (so that a signal can go to its whole process group)."""

    def __init__(self, cmd: list[str], logs: Path):
        logs.mkdir(parents=True, exist_ok=True)
        self.out, self.err = logs / "stdout", logs / "stderr"
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=ENV, start_new_session=True)
        self.workers: dict[int, int] = {}

    def find_workers(self, n: int) -> dict[int, int]:
        """rank -> pid of the launcher's ``n`` torchrun workers (children of the launcher)."""
        def found() -> bool:
            for pid in children(self.proc.pid):
                rank = worker_rank(pid)
                if rank is not None:
                    self.workers[rank] = pid
            return len(self.workers) == n
        wait_for(found, 120, "workers")
        return self.workers

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout=timeout)

    def stderr(self) -> str:
        return self.err.read_text()

    def stdout(self) -> str:
        return self.out.read_text()

    def cleanup(self) -> None:
        for pid in [self.proc.pid, *self.workers.values()]:
            for sig in (signal.SIGCONT, signal.SIGKILL):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
        self.proc.wait(timeout=30)


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return found


def worker_rank(pid: int) -> int | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    ranks = [int(e.split(b"=", 1)[1]) for e in env if e.startswith(b"RANK=")]
    return ranks[0] if ranks else None


def gone(pid: int) -> bool:
    """Whether ``pid`` no longer runs (exited, or a zombie that nobody has reaped yet)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state in ("Z", "X")


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.2)


def steps_logged(run_dir: Path) -> list[int]:
    """The steps of metrics.jsonl's training rows, in file order; every line must parse."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [r["step"] for r in rows if "loss" in r]


def error_lines(err: str) -> list[str]:
    assert "Traceback" not in err, err
    return [line for line in err.splitlines() if line.strip() and not line.startswith("nxdt: warning:")]


def test_fixed_name_checkpoint_killed_mid_save_resumes_from_the_previous_step(tmp_path, data_overrides):
    """filename=latest: a save killed before its marker leaves the previous `latest` (step 1) complete."""
    args = ["exp_manager.checkpoint_callback_params.filename=latest",
            "exp_manager.checkpoint_callback_params.every_n_train_steps=1", "exp_manager.resume_if_exists=true",
            "exp_manager.resume_ignore_no_checkpoint=true"]
    cmd = command(tmp_path, data_overrides, *args, nproc=1, steps=3)
    died = subprocess.run(cmd, env={**ENV, "NXDT_TEST_DIE_DURING_SAVE": "2"}, capture_output=True, text=True, timeout=240)
    assert died.returncode == 17, died.stderr[-2000:]
    store = Store(str(tmp_path / "checkpoints"))
    assert {i.name: (i.complete, i.step) for i in list_checkpoints(store)} == {
        "latest": (True, 1), "latest.nxdt-staging-2": (False, None)}
    res = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"resumed step 1 from {tmp_path / 'checkpoints' / 'latest'}" in res.stdout
    assert {i.name: (i.complete, i.step) for i in list_checkpoints(store)} == {"latest": (True, 3)}
    assert steps_logged(tmp_path) == [1, 2, 3]


def test_run_lock_launcher_kill_takeover_and_ctrl_c(tmp_path, data_overrides):
    """One run directory, three runs: a second concurrent run exits with one line naming the holder;
    killing only the first run's launcher leaves no worker; the third run takes the stale lock over,
    resumes, and Ctrl-C stops it with one line; metrics.jsonl then holds each step once."""
    run_dir = tmp_path / "run"
    args = ["exp_manager.checkpoint_callback_params.every_n_train_steps=3", "exp_manager.resume_if_exists=true",
            "exp_manager.resume_ignore_no_checkpoint=true"]
    first = Job(command(run_dir, data_overrides, *args), tmp_path / "first")
    try:
        workers = first.find_workers(2)
        wait_for(lambda: any(i.complete for i in list_checkpoints(Store(str(run_dir / "checkpoints")))), 180,
                 "the first checkpoint")
        second = subprocess.run(command(run_dir, data_overrides, *args, nproc=1), env=ENV, capture_output=True,
                                text=True, timeout=180)
        assert second.returncode != 0
        (line,) = error_lines(second.stderr)
        assert f"run directory {run_dir} is in use by another run (pid {workers[0]} on" in line

        os.kill(first.proc.pid, signal.SIGKILL)  # the launcher only
        first.wait(30)
        t0 = time.monotonic()
        wait_for(lambda: all(gone(pid) for pid in workers.values()), 15, "the orphaned workers to die")
        print(f"workers gone {time.monotonic() - t0:.2f} s after the launcher was killed")
    finally:
        first.cleanup()

    third = Job(command(run_dir, data_overrides, *args), tmp_path / "third")
    try:
        workers = third.find_workers(2)
        wait_for(lambda: "resumed step" in third.stdout(), 180, "the resume")
        resumed = int(third.stdout().split("resumed step ")[1].split()[0])
        wait_for(lambda: max(steps_logged(run_dir), default=0) >= resumed + 2, 180, "steps after the resume")
        os.killpg(third.proc.pid, signal.SIGINT)  # Ctrl-C reaches the terminal's whole process group
        assert third.wait(60) == 130
        wait_for(lambda: all(gone(pid) for pid in workers.values()), 15, "the workers to stop")
    finally:
        third.cleanup()
    err = third.stderr()
    assert f"taking over the run lock of {run_dir} left by a run that is gone" in err
    assert error_lines(err) == ["nxdt: interrupted: SIGINT received; all 2 local workers were stopped"]
    steps = steps_logged(run_dir)
    assert steps == list(range(1, len(steps) + 1)), steps  # each step once, in order, across the three runs


@pytest.mark.parametrize("fault", ["SIGSTOP", "SIGKILL"])
def test_stuck_or_dead_rank_ends_the_job_naming_it(tmp_path, data_overrides, fault):
    """With collective_timeout_s=10, a stopped rank ends the job within timeout + 30 s, a dead one sooner;
    the one line names rank 1."""
    timeout_s = 10
    job = Job(command(tmp_path / "run", data_overrides, f"distributed_strategy.collective_timeout_s={timeout_s}"),
              tmp_path / "logs")
    try:
        workers = job.find_workers(2)
        wait_for(lambda: len(steps_logged(tmp_path / "run")) >= 2, 180, "training steps")
        os.kill(workers[1], getattr(signal, fault))
        t0 = time.monotonic()
        code = job.wait(timeout_s + 60)
        elapsed = time.monotonic() - t0
        wait_for(lambda: all(gone(pid) for pid in workers.values()), 15, "every worker to end")
    finally:
        job.cleanup()
    print(f"{fault} of rank 1: the job ended after {elapsed:.1f} s (collective timeout {timeout_s} s)")
    assert code != 0 and elapsed <= timeout_s + 30
    (line,) = error_lines(job.stderr())
    if fault == "SIGSTOP":
        assert f"rank 1 (pid {workers[1]} on" in line and "stopped responding" in line, line
    else:
        assert line == f"nxdt: error: rank 1 (pid {workers[1]}) was killed by SIGKILL", line
