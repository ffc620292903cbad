"""Shared harness of the multi-rank tests: tiny-model overrides, the embedded data, one torchrun
launch of a driver script that runs several jobs in one process group, and single-process trainers.

Drivers (tests/*_driver.py) call ``run_jobs``; test files call ``launch`` and ``single_trainer``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent
TOL = 1e-5


def tiny(num_layers: int, max_steps: int, *extra: str) -> list[str]:
    """Overrides that shrink llama3-tiny to a model the 2-core machine trains in a second."""
    return [
        "model.hidden_size=64", f"model.num_layers={num_layers}", "model.num_attention_heads=4", "model.num_kv_heads=2",
        "model.ffn_hidden_size=128", "data.seq_length=32", "data.global_batch_size=8", "data.micro_batch_size=2",
        f"trainer.max_steps={max_steps}", "model.optim.sched.warmup_steps=2", "trainer.val_check_interval=0", *extra,
    ]


def embedded_data_overrides() -> list[str]:
    """The embedded SFT data named explicitly (which also skips the recipe's generation metric)."""
    from nxdt.data.embedded import embedded_paths

    paths = embedded_paths()
    return [f"data.tokenizer.type={paths['tokenizer']}", f"data.train_dir={paths['sft_train']}",
            f"data.val_dir={paths['sft_validation']}"]


def launch(driver: str, out: Path, overrides: list[str], jobs: list[str] = ()) -> dict[str, dict]:
    """One ``torchrun --nproc-per-node 4`` launch of ``driver``; returns each job's JSON result."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NXDT_DEVICE": "cpu"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4",
           str(HERE / driver), str(out), *jobs, "--", *overrides]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return {p.stem: json.loads(p.read_text()) for p in out.glob("*.json")}


def single_trainer(overrides: list[str], run_dir: Path) -> Any:
    """A single-process Trainer of llama3-tiny's sft recipe logging into ``run_dir``."""
    import torch

    from nxdt.parallel.world import World
    from nxdt.resolve import resolve
    from nxdt.train.trainer import Trainer

    torch.manual_seed(0)
    return Trainer(resolve("llama3-tiny", "sft", [*overrides, f"exp_manager.explicit_log_dir={run_dir}"]),
                   World(0, 1, 0, torch.device("cpu"), None))


def run_jobs(
    argv: list[str],
    jobs: dict[str, Any],
    run_one: Callable[[Any, str, Any, Path, list[str]], dict],
    default: list[str] | None = None,
) -> None:
    """Driver main: ``OUT_DIR [JOB ...] -- OVERRIDE ...``; the jobs (else ``default``, else all) in turn.

    ``run_one(world, name, job, out_dir, shared_overrides)`` trains one job on every rank and
    returns its result; rank 0 writes it to ``OUT_DIR/<name>.json``.
    """
    import torch

    from nxdt.parallel.world import init_world, leave_process_group

    sep = argv.index("--") if "--" in argv else len(argv)
    out_dir, names, shared = Path(argv[0]), argv[1:sep] or default or list(jobs), argv[sep + 1 :]
    world = init_world()
    for name in names:
        torch.manual_seed(0)
        result = run_one(world, name, jobs[name], out_dir, shared)
        if world.rank == 0:
            (out_dir / f"{name}.json").write_text(json.dumps(result))
    torch.distributed.barrier()
    leave_process_group()


def train_job(world: Any, overrides: list[str], run_dir: Path) -> Any:
    """Train llama3-tiny's sft recipe with ``overrides`` on ``world``; returns the Trainer and result."""
    from nxdt.resolve import resolve
    from nxdt.train.trainer import Trainer

    trainer = Trainer(resolve("llama3-tiny", "sft", [*overrides, f"exp_manager.explicit_log_dir={run_dir}"]), world)
    return trainer, trainer.fit()


def export_hf(checkpoint: Path, out: Path) -> None:
    """`nxdt export CHECKPOINT --to hf OUT` as a user runs it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "nxdt.cli.main", "export", str(checkpoint), "--to", "hf", str(out)],
                         capture_output=True, text=True, env=env, timeout=240)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
