"""`nxdt run`: resolve the run, then train in this process or launch torchrun workers."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

from nxdt.cli.worker import LAUNCHER_PID_ENV, STATUS_DIR_ENV
from nxdt.errors import ConfigError, NxdtError

WORKER_MODULE = "nxdt.cli.worker"


def add_parser(sub: argparse._SubParsersAction, add_common: Callable[[argparse.ArgumentParser], None]) -> None:
    """Register `nxdt run` and its launch options (named as torchrun names them)."""
    p = sub.add_parser("run", help="train a preset or an NxDT YAML config")
    p.add_argument("target", help="a preset name (see `nxdt list`) or a YAML config file")
    p.add_argument("overrides", nargs="*", help="key.path=value overrides, applied last")
    p.add_argument("--recipe", help="pretrain | sft | a plugin's recipe (default: sft for presets, pretrain for YAML without SFT keys)")
    p.add_argument("--nproc-per-node", "--nproc_per_node", dest="nproc_per_node", type=int, help="workers per node (default: trainer.devices)")
    p.add_argument("--nnodes", type=str, help="nodes, or MIN:MAX for elastic runs (default: trainer.num_nodes)")
    p.add_argument("--node-rank", "--node_rank", dest="node_rank", type=int, default=None, help="this node's rank (static rendezvous)")
    p.add_argument("--rdzv-endpoint", "--rdzv_endpoint", dest="rdzv_endpoint", help="host:port of the c10d rendezvous")
    p.add_argument("--rdzv-id", "--rdzv_id", dest="rdzv_id", default=None, help="rendezvous id shared by all nodes of a job")
    p.add_argument("--max-restarts", "--max_restarts", dest="max_restarts", type=int, default=0, help="worker group restarts on failure")
    p.add_argument("--dry-run", action="store_true",
                   help="run every check the run makes (layout, data, tokenizer, names, fit), print the run, exit")
    add_common(p)


def dispatch(args: argparse.Namespace) -> int:
    """Run the `run` command."""
    from nxdt.resolve import resolve

    overrides = list(args.overrides)
    if args.nproc_per_node:
        overrides.append(f"trainer.devices={args.nproc_per_node}")
    if args.nnodes and ":" not in args.nnodes:
        overrides.append(f"trainer.num_nodes={int(args.nnodes)}")
    recipe = args.recipe or default_recipe(args.target)
    resolved = resolve(args.target, recipe, overrides)
    cfg = resolved.config
    nproc = cfg.trainer.devices or 1
    nnodes = args.nnodes or str(cfg.trainer.num_nodes or 1)
    world_size = nproc * int(nnodes.split(":")[-1])
    from nxdt.cli.preflight import preflight, world_advice

    try:
        parallel = resolved.parallel_dims(world_size)
    except ConfigError as exc:
        raise ConfigError(f"{exc}{world_advice(resolved)}") from None

    # Every check the run makes before training; a real run leaves the data to its workers.
    preflight(resolved, world_size, nproc, data=args.dry_run)
    if args.dry_run:
        return print_dry_run(resolved, parallel, world_size, nproc, nnodes, args.json)
    worker_args = ["--recipe", recipe, args.target, *overrides]
    if world_size == 1 and "LOCAL_RANK" not in os.environ:
        from nxdt.cli.worker import train

        train(worker_args)
        return 0
    return launch_torchrun(args, nproc, nnodes, worker_args, cfg.distributed_strategy.collective_timeout_s)


def default_recipe(target: str) -> str:
    """The family's default recipe for presets (sft for causal LMs); for YAML, sft when it configures sft."""
    from nxdt.resolve import default_recipe as resolve_default

    return resolve_default(target)


def launch_torchrun(args: argparse.Namespace, nproc: int, nnodes: str, worker_args: list[str],
                    timeout_s: float = 600) -> int:
    """Start the workers through torchrun's elastic launcher (``torch.distributed.run``).

    The workers die with this process (see nxdt.cli.worker), report heartbeats and errors to a
    status directory, and this process prints one line for the whole job: the rank that failed
    first (a rank that stopped responding is found from its heartbeat and killed once it has
    been silent longer than the collective timeout), or the signal that stopped the job.
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    launch = ["--nproc-per-node", str(nproc), "--nnodes", nnodes, "--max-restarts", str(args.max_restarts)]
    if nnodes == "1" and not args.rdzv_endpoint:
        launch.append("--standalone")
    else:
        if not args.rdzv_endpoint:
            raise NxdtError("multi-node runs need --rdzv-endpoint HOST:PORT (the same on every node)")
        launch += ["--rdzv-backend", "c10d", "--rdzv-endpoint", args.rdzv_endpoint]
        launch += ["--rdzv-id", args.rdzv_id or "nxdt"]
        if args.node_rank is not None:
            launch += ["--node-rank", str(args.node_rank)]
    launch += ["-m", WORKER_MODULE, *worker_args]
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // max(1, nproc))))
    debug = bool(os.environ.get("NXDT_DEBUG"))
    if not debug:
        # torchrun logs every worker failure and shutdown step; nxdt reports the job in one line.
        # Its loggers carry their own levels, so each is quietened rather than their parent.
        for name in list(logging.root.manager.loggerDict):
            if name.startswith(("torch.distributed.elastic", "torch.distributed.run", "torch.distributed.launcher")):
                logging.getLogger(name).setLevel(logging.CRITICAL)
    status_dir = tempfile.mkdtemp(prefix="nxdt-run-")
    os.environ[STATUS_DIR_ENV] = status_dir
    os.environ[LAUNCHER_PID_ENV] = str(os.getpid())
    watchdog = Watchdog(status_dir, timeout_s)
    watchdog.start()
    try:
        run(get_args_parser().parse_args(launch))
    except ChildFailedError as exc:
        watchdog.stop()
        raise job_failure(exc.failures, status_dir, watchdog) from None
    except SignalException as exc:
        watchdog.stop()
        name = signal.Signals(exc.sigval).name
        raise Interrupted(f"{name} received; all {nproc} local workers were stopped",
                          128 + int(exc.sigval)) from None
    finally:
        watchdog.stop()
        for key in (STATUS_DIR_ENV, LAUNCHER_PID_ENV):
            os.environ.pop(key, None)
        shutil.rmtree(status_dir, ignore_errors=True)
    return 0


class Interrupted(NxdtError):
    """The job was stopped by a signal (Ctrl-C, SIGTERM); exits 128 + the signal number."""

    interrupt = True

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class JobFailed(NxdtError):
    """A worker failed; the exit code is the failing worker's (1 when it has none)."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code if 0 < exit_code < 256 else 1


def _read_json(path: str) -> dict[str, Any] | None:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


class Watchdog:
    """Watches the workers' heartbeats; kills a worker silent for longer than the collective timeout + grace.

    A silent worker is stopped (SIGSTOP), frozen or swapped out: its peers' collectives time out
    after ``timeout_s`` and fail, while torchrun would wait for the stopped process to take its
    SIGTERM. Killing it ends the job promptly, and the verdict names the stuck rank.
    """

    def __init__(self, status_dir: str, timeout_s: float):
        self.status_dir = status_dir
        self.silence_s = timeout_s + max(5.0, 0.1 * timeout_s)
        self.verdicts: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="nxdt-watchdog")

    def start(self) -> None:
        """Start watching."""
        self._thread.start()

    def stop(self) -> None:
        """Stop watching."""
        self._stop.set()

    def _loop(self) -> None:
        while not self._stop.wait(1.0):
            self.check()

    def check(self, now: float | None = None) -> None:
        """Kill every worker whose heartbeat is older than ``silence_s`` (once each)."""
        now = time.time() if now is None else now
        judged = {v["rank"] for v in self.verdicts}
        try:
            names = os.listdir(self.status_dir)
        except OSError:
            return
        for fname in names:
            if not (fname.startswith("rank") and fname.endswith(".json")) or fname.endswith(".error.json"):
                continue
            beat = _read_json(os.path.join(self.status_dir, fname))
            if not beat or beat.get("rank") in judged:
                continue
            if os.path.exists(os.path.join(self.status_dir, f"rank{beat.get('rank')}.error.json")):
                continue  # it reported its own failure
            silent = now - float(beat.get("time", now))
            if silent > self.silence_s:
                pid = int(beat.get("pid", 0))
                if _parent_of(pid) != os.getpid():  # not (or no longer) one of this launcher's workers
                    continue
                try:
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError, OverflowError):
                    continue
                self.verdicts.append({**beat, "silent_s": silent, "when": now})


def _parent_of(pid: int) -> int | None:
    """The parent pid of process ``pid`` (Linux /proc), or None when it is gone or unknown."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def job_failure(failures: dict[int, Any], status_dir: str, watchdog: Watchdog) -> JobFailed:
    """The one error of a failed job: the stuck rank, else the first own error, else the first death.

    Ranks are ordered by when they failed (their own report's time), not by rank number: the
    ranks that fail because another one did (timeouts, lost connections) come last.
    """
    if watchdog.verdicts:
        v = min(watchdog.verdicts, key=lambda v: v["when"])
        step = f" at step {v['step']}" if v.get("step") is not None else ""
        return JobFailed(f"rank {v['rank']} (pid {v.get('pid')} on {v.get('host')}) stopped responding{step}: no "
                         f"heartbeat for {v['silent_s']:.0f} s, longer than distributed_strategy.collective_timeout_s; "
                         "it was killed and the job stopped", 1)
    reports = []
    for fname in os.listdir(status_dir) if os.path.isdir(status_dir) else []:
        if fname.endswith(".error.json"):
            report = _read_json(os.path.join(status_dir, fname))
            if report and isinstance(report.get("rank"), int):
                reports.append(report)
    primary = sorted((r for r in reports if not r.get("secondary")), key=lambda r: r.get("time", 0))
    if primary:
        r = primary[0]
        same = sorted(p["rank"] for p in primary if p.get("message") == r.get("message"))
        who = f"rank {same[0]}" if len(same) == 1 else f"ranks {', '.join(map(str, same))}"
        return JobFailed(f"{who}: {r['message']}", int(r.get("exit_code", 1)))
    reported = {r["rank"] for r in reports}
    deaths = sorted(((rank, f) for rank, f in failures.items() if rank not in reported),
                    key=lambda item: (item[1].timestamp, item[0]))
    # The launcher stops the surviving ranks with SIGTERM: a rank that died of another signal
    # (SIGABRT, SIGSEGV, an OOM SIGKILL) is the cause even when its death is stamped in the same second.
    killed = sorted(((rank, f) for rank, f in deaths if f.exitcode < 0), key=lambda item: item[1].exitcode == -signal.SIGTERM)
    if killed or deaths:
        rank, f = (killed or deaths)[0]
        if f.exitcode < 0:
            sig = signal.Signals(-f.exitcode).name if -f.exitcode in signal.valid_signals() else str(-f.exitcode)
            return JobFailed(f"rank {rank} (pid {f.pid}) was killed by {sig}", 128 - f.exitcode)
        return JobFailed(f"rank {rank} (pid {f.pid}) exited with code {f.exitcode}", f.exitcode)
    if reports:
        r = min(reports, key=lambda r: r.get("time", 0))
        return JobFailed(f"rank {r['rank']}: {r['message']}", int(r.get("exit_code", 1)))
    return JobFailed("a worker failed", 1)


def print_dry_run(resolved, parallel, world_size: int, nproc: int, nnodes: str, as_json: bool) -> int:
    """Print the resolved run: config, world layout, accumulation and tokens per step."""
    cfg = resolved.config
    from nxdt.resolve import gradient_accumulation

    mbs, gbs = cfg.data.micro_batch_size, cfg.data.global_batch_size
    summary = {
        "target": resolved.source,
        "family": resolved.family,
        "recipe": resolved.recipe.name if resolved.recipe else None,
        "world": {"nnodes": nnodes, "nproc_per_node": nproc, "world_size": world_size},
        "layout": {"dp": parallel.dp, "tp": parallel.tp, "pp": parallel.pp, "ep": parallel.ep, "cp": parallel.cp,
                   "sequence_parallel": parallel.sequence_parallel},
        "micro_batch_size": mbs,
        "global_batch_size": gbs,
        "gradient_accumulation": gradient_accumulation(cfg, parallel.dp),
        "tokens_per_step": gbs * cfg.data.seq_length,
        "max_steps": cfg.trainer.max_steps,
        "unused_keys": cfg.unused_keys(backend="torch"),
    }
    peft = cfg.model_alignment_strategy.peft if cfg.model_alignment_strategy else None
    if peft is not None:
        from nxdt.peft.lora import LoRASettings

        lora = LoRASettings.for_family(peft, resolved.spec)
        summary["peft"] = (f"LoRA r={lora.rank} alpha={lora.alpha:g} dropout={lora.dropout:g} bias={lora.bias} on "
                           f"{', '.join(lora.targets)}: the adapters train, the base weights are frozen")
    from nxdt.plan import lines, machine_plan

    plan = machine_plan(resolved, world_size, nproc)  # the memory plan the fit check judged, on this machine
    if as_json:
        print(json.dumps({**summary, "memory_plan": plan.as_dict(), "config": cfg.to_dict()}, indent=2, default=str))
        return 0
    print(cfg.to_yaml(), end="")
    print("# --- run ---")
    for key, value in summary.items():
        print(f"# {key}: {value}")
    print("# --- memory ---")
    for line in lines(plan):
        print(f"# {line}")
    return 0
