"""Training tokens/s with `model.fusions.torch_compile`: nxdt compiled vs eager, and vs compiled transformers.

Three sides train the same Llama from identical weights on the same batches with the same AdamW
and clipping (bench/throughput.py's set-up): nxdt eager, nxdt with ``model.fusions.torch_compile=true``
(each block compiled after TP and activation checkpointing, as torchtitan does), and transformers'
``LlamaForCausalLM`` with each decoder layer compiled the same way. Compilation (the first steps)
is timed separately; the steady state runs in interleaved rounds with rotating order, reported as
median tokens/s with min/max and ratios.

    python bench/compile.py                  # tiny llama, fp32, CPU (several minutes: inductor compiles C++)
    python bench/compile.py --threads 1 --json
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
from typing import Any

import torch
from machine import describe_machine
from throughput import (
    build_hf,
    build_nxdt,
    initial_losses,
    make_batches,
    manual_step_fn,
    same_adamw,
    time_steps,
)

SIDES = ("nxdt_eager", "nxdt_compiled", "hf_compiled")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (a subset of bench/throughput.py's)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=("tiny", "llama-1b"), default="tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", choices=("fp32", "autocast"), default="fp32")
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--grad-accum", type=int, default=2)
    p.add_argument("--warmup", type=int, default=3, help="steps per side before timing (the first compiles)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per side per round")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    args.override = []
    return args


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Build the sides, time their compilation, then the steady state in interleaved rounds."""
    torch.set_num_threads(args.threads)
    dirs = [tempfile.TemporaryDirectory(prefix="nxdt-bench-compile-") for _ in range(2)]
    eager = build_nxdt(args, dirs[0].name)
    args.override = ["model.fusions.torch_compile=true"]
    compiled = build_nxdt(args, dirs[1].name)
    compiled.model.trainable_module.load_state_dict(eager.model.trainable_module.state_dict())
    hf_model = build_hf(eager)
    for layer in hf_model.model.layers:
        layer.compile()  # per block, as nxdt compiles its blocks
    device = eager.world.device
    autocast = args.precision == "autocast"
    steps = {
        "nxdt_eager": eager.train_step,
        "nxdt_compiled": compiled.train_step,
        "hf_compiled": manual_step_fn(lambda ids: hf_model(input_ids=ids).logits, hf_model,
                                      same_adamw(hf_model.parameters(), eager.optimizer), device.type, autocast),
    }
    batches = make_batches(args, eager.run.arch.vocab_size, device)
    losses = initial_losses({"nxdt_eager": eager.model.trainable_module,
                             "nxdt_compiled": copy.deepcopy(compiled.model.trainable_module),
                             "hf_compiled": lambda ids: hf_model(input_ids=ids).logits}, batches[0])
    warm: dict[str, list[float]] = {}
    for name, step in steps.items():
        warm[name] = [time_steps(step, batches, 1, device) for _ in range(args.warmup)]
    tokens = args.steps * args.grad_accum * args.micro_batch * args.seq
    rates: dict[str, list[float]] = {s: [] for s in SIDES}
    for r in range(args.rounds):
        for side in SIDES[r % 3:] + SIDES[:r % 3]:
            rates[side].append(tokens / time_steps(steps[side], batches, args.steps, device))
    median = {s: statistics.median(v) for s, v in rates.items()}
    step_s = {s: tokens / args.steps / median[s] for s in SIDES}
    for d in dirs:
        d.cleanup()
    return {
        "machine": describe_machine(),
        "config": {k: v for k, v in vars(args).items() if k not in ("json", "override")},
        "initial_loss": losses,
        # compilation: the first step's time beyond a steady step (inductor's cache may shorten reruns)
        "compile_s": {s: warm[s][0] - step_s[s] for s in SIDES},
        "tokens_per_s": {s: {"median": median[s], "min": min(v), "max": max(v), "rounds": v} for s, v in rates.items()},
        "ratio": {"nxdt_compiled/nxdt_eager": median["nxdt_compiled"] / median["nxdt_eager"],
                  "nxdt_compiled/hf_compiled": median["nxdt_compiled"] / median["hf_compiled"]},
    }


def report(result: dict[str, Any]) -> str:
    """Human-readable table of a ``run`` result."""
    cfg, tps = result["config"], result["tokens_per_s"]
    lines = [f"machine: {result['machine']}",
             f"config: preset={cfg['preset']} precision={cfg['precision']} micro_batch={cfg['micro_batch']} "
             f"seq={cfg['seq']} grad_accum={cfg['grad_accum']} threads={cfg['threads']} rounds={cfg['rounds']}",
             "initial loss: " + ", ".join(f"{k}={v:.6f}" for k, v in result["initial_loss"].items()), "",
             f"{'side':<14} {'median tok/s':>13} {'min':>9} {'max':>9} {'compile s':>10}"]
    for side in SIDES:
        lines.append(f"{side:<14} {tps[side]['median']:>13.0f} {tps[side]['min']:>9.0f} {tps[side]['max']:>9.0f} "
                     f"{result['compile_s'][side]:>10.1f}")
    lines.append("")
    lines += [f"{k}: {v:.3f}x" for k, v in result["ratio"].items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    args = parse_args(argv)
    result = run(args)
    print(__import__("json").dumps(result, indent=2) if args.json else report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
