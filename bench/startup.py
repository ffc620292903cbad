"""Start-up cost of the CLI against `import torch`, and the fixed cost of a short SFT run.

Two measurements, each in fresh processes and interleaved rounds so that load from other processes
falls on both sides of every ratio alike:

- ``nxdt list`` and ``nxdt inspect llama3-70b`` against ``python -c "import torch"`` (the floor
  any torch program pays): the median of the per-round ratios (issue 15's bound for list: 1.5x).
- ``nxdt run llama3-tiny --recipe sft`` for 1 step and for 20 steps (checkpoint saved, the
  exact-match evaluation before and after training included): the fixed cost is the 1-step wall
  time minus one step's share of the difference (issue 15's bound: 10 s on a quiet machine).

Usage::

    python bench/startup.py                 # 5 CLI rounds, 2 SFT rounds, one thread per process
    python bench/startup.py --json          # per-round figures too
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe_machine  # noqa: E402
from rounds import median_range  # noqa: E402

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "NXDT_DEVICE": "cpu"}
NXDT = [sys.executable, "-m", "nxdt.cli.main"]
COMMANDS = {
    "import_torch": [sys.executable, "-c", "import torch"],
    "list": [*NXDT, "list"],
    "inspect": [*NXDT, "inspect", "llama3-70b"],
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds of the CLI commands")
    p.add_argument("--sft-rounds", type=int, default=2, help="interleaved rounds of the 1- and 20-step runs")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    return p.parse_args(argv)


def wall(args: list[str]) -> float:
    """Seconds one command takes in a fresh process (it must succeed)."""
    t0 = time.perf_counter()
    res = subprocess.run(args, capture_output=True, text=True, env=ENV, timeout=900)
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed: {res.stderr.strip().splitlines()[-1:]}")
    return time.perf_counter() - t0


def sft(steps: int, run_dir: str) -> float:
    """Wall time of the README's SFT run cut to ``steps`` steps, its last checkpoint saved."""
    return wall([*NXDT, "run", "llama3-tiny", "--recipe", "sft", f"trainer.max_steps={steps}",
                 f"exp_manager.explicit_log_dir={run_dir}", "exp_manager.checkpoint_callback_params.save_last=true"])


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Measure both parts; returns medians, ranges and per-round ratios."""
    for cmd in COMMANDS.values():
        wall(cmd)  # warm the file cache
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for r in range(args.rounds):
        names = list(COMMANDS) if r % 2 == 0 else list(reversed(COMMANDS))
        for name in names:
            times[name].append(wall(COMMANDS[name]))
    ratios = {name: [t / base for t, base in zip(times[name], times["import_torch"])] for name in ("list", "inspect")}
    one, twenty, fixed = [], [], []
    with tempfile.TemporaryDirectory(prefix="nxdt-startup-") as tmp:
        for r in range(args.sft_rounds):
            order = [1, 20] if r % 2 == 0 else [20, 1]
            got = {steps: sft(steps, os.path.join(tmp, f"r{r}-{steps}")) for steps in order}
            one.append(got[1])
            twenty.append(got[20])
            fixed.append(got[1] - (got[20] - got[1]) / 19)
    return {
        "machine": describe_machine(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "seconds": {name: median_range(v) for name, v in times.items()},
        "ratio_to_import_torch": {name: median_range(v) for name, v in ratios.items()},
        "sft_seconds": {"1_step": median_range(one), "20_steps": median_range(twenty)},
        "sft_fixed_cost_s": median_range(fixed),
        "rounds": {"cli": times, "sft_1": one, "sft_20": twenty},
    }


def report(result: dict[str, Any]) -> str:
    """The result as a few lines of text."""
    lines = [f"machine: {result['machine']}, {result['date']}", "", "command        median s     min     max   ratio to import torch (per-round median, min-max)"]
    for name, s in result["seconds"].items():
        r = result["ratio_to_import_torch"].get(name)
        ratio = f"{r['median']:.2f}x ({r['min']:.2f}-{r['max']:.2f})" if r else "-"
        lines.append(f"{name:<14}{s['median']:>9.2f}{s['min']:>8.2f}{s['max']:>8.2f}   {ratio}")
    one, twenty, fixed = result["sft_seconds"]["1_step"], result["sft_seconds"]["20_steps"], result["sft_fixed_cost_s"]
    lines += ["", f"sft: 1 step {one['median']:.1f} s ({one['min']:.1f}-{one['max']:.1f}), 20 steps {twenty['median']:.1f} s "
              f"({twenty['min']:.1f}-{twenty['max']:.1f}); fixed cost {fixed['median']:.1f} s ({fixed['min']:.1f}-{fixed['max']:.1f})"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    args = parse_args(argv)
    result = run(args)
    print(json.dumps(result, indent=2) if args.json else report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
