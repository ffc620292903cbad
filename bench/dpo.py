"""DPO with precomputed reference log-probs vs a live frozen reference model: peak memory and training tokens/s.

Each measurement is a fresh process (so its peak RSS is its own) that builds the real Trainer of
``llama3-tiny --recipe dpo`` at a larger shape, prepares the reference (the precompute pass over
the training and validation pairs, or the frozen copy), then times training steps. The two modes
run in interleaved rounds with alternating order, so load from other processes falls on both.

    python bench/dpo.py                      # 3 rounds, ~13M-parameter model, CPU (~15 min on 2 shared cores)
    python bench/dpo.py --threads 1 --rounds 5 --json   # steadier on a shared machine; per-round figures
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from machine import describe_machine
from rounds import median_range

MODES = ("precomputed", "live")
# ~13M parameters: the frozen reference's weights stand well clear of the process's baseline RSS,
# while a step of 8 pairs still takes seconds on a 2-core CPU.
SHAPE = ["model.hidden_size=512", "model.num_layers=4", "model.num_attention_heads=8", "model.num_kv_heads=4",
         "model.ffn_hidden_size=1536"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (``--worker`` is the per-measurement mode the launcher uses)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=4, help="timed training steps per measurement")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--pairs", type=int, default=64, help="training pairs (the precompute pass covers them all)")
    p.add_argument("--response", type=int, default=40, help="letters per prompt and per response")
    p.add_argument("--micro-batch", type=int, default=4, help="pairs per micro-batch")
    p.add_argument("--grad-accum", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", action="store_true")
    p.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def write_pairs(path: Path, n: int, letters: int, seed: int = 0) -> None:
    """``n`` copy-task pairs of ``letters`` capitals (one token each): correct copy vs one letter changed."""
    rng = random.Random(seed)
    abc = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    rows = []
    for _ in range(n):
        word = "".join(rng.choice(abc) for _ in range(letters))
        at = rng.randrange(letters)
        wrong = word[:at] + rng.choice([c for c in abc if c != word[at]]) + word[at + 1 :]
        rows.append({"prompt": f"copy: {word} =", "chosen": word, "rejected": wrong})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def peak_rss_mib() -> float:
    """This process's peak resident set (VmHWM) in MiB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def worker(args: argparse.Namespace) -> dict[str, Any]:
    """Build the DPO trainer, prepare its reference, time training steps; return the figures."""
    import torch

    from nxdt.parallel.world import World
    from nxdt.resolve import resolve
    from nxdt.train.trainer import Trainer

    torch.set_num_threads(args.threads)
    gbs = args.micro_batch * args.grad_accum
    data = Path(args.data)
    overrides = [*SHAPE, "data.seq_length=128", f"data.micro_batch_size={args.micro_batch}",
                 f"data.global_batch_size={gbs}", f"data.train_dir={data / 'train.jsonl'}",
                 f"data.val_dir={data / 'val.jsonl'}", "exp_manager.create_tensorboard_logger=false",
                 f"model_alignment_strategy.dpo.precompute_ref_log_probs={str(args.worker == 'precomputed').lower()}",
                 f"exp_manager.explicit_log_dir={tempfile.mkdtemp(prefix='nxdt-bench-dpo-')}"]
    trainer = Trainer(resolve("llama3-tiny", "dpo", overrides), World(0, 1, 0, torch.device("cpu"), None))
    trainer.setup()
    t0 = time.perf_counter()
    trainer.objective.setup(trainer)  # the precompute pass, or building the frozen copy
    reference_s = time.perf_counter() - t0
    steps = trainer.data.train_steps(0)
    tokens_per_step = gbs * trainer.data.train[0]["input_ids"].numel()
    for _ in range(args.warmup):
        trainer.train_step(next(steps))
    t0 = time.perf_counter()
    losses = [trainer.train_step(next(steps))["loss"] for _ in range(args.steps)]
    elapsed = time.perf_counter() - t0
    return {"mode": args.worker, "tokens_per_s": tokens_per_step * args.steps / elapsed, "reference_s": reference_s,
            "peak_rss_mib": peak_rss_mib(), "losses": losses, "tokens_per_step": tokens_per_step}


def main(argv: list[str] | None = None) -> None:
    """Interleaved rounds of both modes, each in its own process; print medians with min/max."""
    args = parse_args(argv)
    if args.worker:
        Path(args.out).write_text(json.dumps(worker(args)))
        return
    data = Path(tempfile.mkdtemp(prefix="nxdt-bench-dpo-data-"))
    write_pairs(data / "train.jsonl", args.pairs, args.response)
    write_pairs(data / "val.jsonl", args.micro_batch * args.grad_accum, args.response, seed=1)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in MODES}
    for r in range(args.rounds):
        for mode in MODES if r % 2 == 0 else MODES[::-1]:
            out = data / f"{mode}-{r}.json"
            cmd = [sys.executable, __file__, "--worker", mode, "--data", str(data), "--out", str(out),
                   *(f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                     if k in ("steps", "warmup", "micro_batch", "grad_accum", "threads"))]
            subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
            runs[mode].append(json.loads(out.read_text()))
    result = {
        "date": datetime.date.today().isoformat(), "machine": describe_machine(),
        "load_average": os.getloadavg(), "settings": {k: v for k, v in vars(args).items() if k not in ("worker", "data", "out")},
        "tokens_per_step": runs["live"][0]["tokens_per_step"],
        "same_losses": all(a["losses"] == b["losses"] for a, b in zip(runs["precomputed"], runs["live"])),
        # each round's ratio: both modes ran back to back, so it is the steadier figure on a busy machine
        "round_ratio": median_range([a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(runs["precomputed"], runs["live"])]),
        **{m: {k: median_range([x[k] for x in runs[m]]) for k in ("tokens_per_s", "peak_rss_mib", "reference_s")} for m in MODES},
        "rounds": runs,
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{result['date']}  {result['machine']}  load average {result['load_average']}")
    print(f"tokens/step {result['tokens_per_step']}, same losses in both modes: {result['same_losses']}")
    for mode in MODES:
        row = result[mode]
        print(f"{mode:>12}: " + ", ".join(f"{k} {v['median']:.1f} [{v['min']:.1f}, {v['max']:.1f}]" for k, v in row.items()))
    pre, live = result["precomputed"], result["live"]
    print(f"precomputed / live: tokens/s x{pre['tokens_per_s']['median'] / live['tokens_per_s']['median']:.2f} "
          f"(per-round median x{result['round_ratio']['median']:.2f}), "
          f"peak RSS {pre['peak_rss_mib']['median'] - live['peak_rss_mib']['median']:+.0f} MiB")


if __name__ == "__main__":
    main()
