"""LoRA SFT against full SFT on the same model: peak memory (RSS) and training tokens/s, same run.

Each round runs `nxdt run llama3-tiny --recipe sft` twice in fresh processes (full fine-tune, then
LoRA on q/k/v/o, or the reverse order in odd rounds, so load from other processes falls on both
alike) on a model large enough for weights, gradients and optimizer state to show (a Llama shape of
~30M parameters). Peak memory is the child's maximum resident set (``wait4``), tokens/s the median
of the logged steps after the first two.

    python bench/lora.py                  # 3 rounds, ~4 min on 2 cores
    python bench/lora.py --rounds 5 --json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from machine import describe_machine
from rounds import median_range

SHAPE = ["model.hidden_size=512", "model.num_layers=8", "model.num_attention_heads=8", "model.num_kv_heads=4",
         "model.ffn_hidden_size=1536", "model.vocab_size=8192", "data.seq_length=128",
         "data.micro_batch_size=8", "data.global_batch_size=16", "trainer.val_check_interval=0",
         "trainer.limit_test_batches=0", "trainer.log_every_n_steps=1", "exp_manager.create_checkpoint_callback=false"]
LORA = ["model_alignment_strategy.peft.lora_rank=16", "model_alignment_strategy.peft.lora_alpha=32",
        "model_alignment_strategy.peft.target_modules=[qkv_proj,o_proj]"]
SIDES = {"full": [], "lora": LORA}


def run_once(extra: list[str], steps: int, threads: int) -> dict[str, float]:
    """One fresh `nxdt run`; its peak RSS (MiB) and median tokens/s."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "nxdt.cli.main", "run", "llama3-tiny", "--recipe", "sft", *SHAPE, *extra,
               f"trainer.max_steps={steps}", f"exp_manager.explicit_log_dir={tmp}/run"]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "NXDT_DEVICE": "cpu"}
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"run failed: {proc.stderr.read().decode()[-2000:] if proc.stderr else ''}")
        rates = [json.loads(line)["tokens_per_s"] for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()
                 if '"tokens_per_s"' in line]
    return {"peak_rss_mib": usage.ru_maxrss / 1024, "tokens_per_s": statistics.median(rates[2:] or rates)}


def main(argv: list[str] | None = None) -> int:
    """Interleave full and LoRA rounds; print medians with min/max and the ratios."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    results: dict[str, list[dict[str, float]]] = {side: [] for side in SIDES}
    for r in range(args.rounds):
        for side in (list(SIDES) if r % 2 == 0 else list(reversed(SIDES))):
            results[side].append(run_once(SIDES[side], args.steps, args.threads))
    summary: dict[str, Any] = {"machine": describe_machine(), "rounds": args.rounds, "threads": args.threads}
    for side, runs in results.items():
        for key in ("peak_rss_mib", "tokens_per_s"):
            values = [run[key] for run in runs]
            summary[f"{side}_{key}"] = median_range(values)
    summary["memory_ratio_lora_over_full"] = summary["lora_peak_rss_mib"]["median"] / summary["full_peak_rss_mib"]["median"]
    summary["speed_ratio_lora_over_full"] = summary["lora_tokens_per_s"]["median"] / summary["full_tokens_per_s"]["median"]
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    for side in SIDES:
        m, t = summary[f"{side}_peak_rss_mib"], summary[f"{side}_tokens_per_s"]
        print(f"{side:5s} peak RSS {m['median']:.0f} MiB ({m['min']:.0f}-{m['max']:.0f}), "
              f"{t['median']:.0f} tokens/s ({t['min']:.0f}-{t['max']:.0f})")
    print(f"LoRA / full: memory {summary['memory_ratio_lora_over_full']:.3f}x, speed {summary['speed_ratio_lora_over_full']:.3f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
