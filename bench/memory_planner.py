"""The memory planner against measured peaks: `nxdt run` per layout on CPU, predicted vs measured per rank.

Each case is a real `nxdt run` (torchrun with gloo for several ranks, OMP_NUM_THREADS=1 per rank)
of llama3-tiny reshaped to a model whose weights or activations dominate; every rank records its
peak resident set above the trainer's start (nxdt.train.memory) in result.json, by phase. The
planner (nxdt.plan) predicts each rank's peak from the same config; the table shows both, and the
ratio of the build (materialise + HF load) peak to the one-process one, which the sharded build is
to bring under 0.6 for TP=2 and PP=2.

    python bench/memory_planner.py                      # every case (~15-25 min on 2 loaded cores)
    python bench/memory_planner.py --case 1proc --case tp2-sp --json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

from machine import describe_machine

# Weights dominate: ~156M parameters (embeddings 65M), fp32 weights 0.6 GB; seq 256.
WEIGHTS = ["model.hidden_size=1024", "model.num_layers=8", "model.num_attention_heads=8", "model.num_kv_heads=2",
           "model.ffn_hidden_size=2816", "model.vocab_size=32000", "model.max_position_embeddings=1024",
           "data.seq_length=256", "model.encoder_seq_length=256", "data.micro_batch_size=2",
           "data.global_batch_size=4"]
# Activations dominate: ~58M parameters, seq 1024, 2 rows per micro-batch.
ACTIVATIONS = ["model.hidden_size=512", "model.num_layers=8", "model.num_attention_heads=8", "model.num_kv_heads=2",
               "model.ffn_hidden_size=1408", "model.vocab_size=32000", "model.max_position_embeddings=1024",
               "data.seq_length=1024", "model.encoder_seq_length=1024", "data.micro_batch_size=2",
               "data.global_batch_size=2"]
TP2_SP = ["distributed_strategy.tensor_model_parallel_size=2", "distributed_strategy.sequence_parallel=true"]
CASES: dict[str, tuple[int, list[str]]] = {
    "1proc": (1, WEIGHTS),
    "tp2-sp": (2, WEIGHTS + TP2_SP),
    "pp2": (2, WEIGHTS + ["distributed_strategy.pipeline_model_parallel_size=2"]),
    "dp2-zero1-mixed": (2, WEIGHTS + ["distributed_strategy.zero1=true", "precision.type=mixed_precision"]),
    "1proc-mixed": (1, WEIGHTS + ["precision.type=mixed_precision"]),
    "hf-1proc": (1, WEIGHTS + ["model.hf_checkpoint={hf}"]),
    "hf-tp2-sp": (2, WEIGHTS + TP2_SP + ["model.hf_checkpoint={hf}"]),
    "act-none": (1, ACTIVATIONS),
    "act-full": (1, ACTIVATIONS + ["model.activations_checkpoint_granularity=full"]),
    "act-selective": (1, ACTIVATIONS + ["model.activations_checkpoint_granularity=selective",
                                        "model.activations_checkpoint_recompute=[CoreAttention]"]),
}
COMMON = ["trainer.max_steps=3", "trainer.val_check_interval=0", "trainer.limit_val_batches=0",
          "exp_manager.create_checkpoint_callback=false", "exp_manager.create_tensorboard_logger=false",
          "trainer.log_every_n_steps=1"]
GIB = 1 << 30


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--case", action="append", choices=sorted(CASES), help="cases to run (repeatable; default all)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    return p.parse_args(argv)


def write_hf_checkpoint(out: str) -> str:
    """An HF checkpoint (bf16 safetensors + config.json) of the WEIGHTS model, for the load cases."""
    import torch
    from safetensors.torch import save_file

    from nxdt.resolve import resolve

    run = resolve("llama3-tiny", "pretrain", WEIGHTS)
    model = run.spec.build_model(run.arch)
    with torch.no_grad():
        run.spec.init_weights(model, run.arch)
    state = run.spec.state_dict_adapter(run.arch).to_hf({k: v.detach() for k, v in model.state_dict().items()
                                                         if k in dict(model.named_parameters())})
    os.makedirs(out, exist_ok=True)
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in state.items()}, os.path.join(out, "model.safetensors"))
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump({**run.spec.config_to_hf(run.arch), "torch_dtype": "bfloat16"}, f)
    return out


def measure(name: str, tmp: str, hf: str) -> dict[str, Any]:
    """Run one case; its per-rank measurements and the planner's per-rank predictions."""
    from nxdt.plan import plan_memory
    from nxdt.resolve import resolve

    nproc, overrides = CASES[name]
    overrides = [o.format(hf=hf) for o in overrides] + COMMON
    run_dir = os.path.join(tmp, name)
    cmd = [sys.executable, "-m", "nxdt.cli.main", "run", "llama3-tiny", "--recipe", "pretrain",
           "--nproc-per-node", str(nproc), *overrides, f"exp_manager.explicit_log_dir={run_dir}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NXDT_DEVICE": "cpu"}
    t0 = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{name}: {' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    with open(os.path.join(run_dir, "result.json")) as f:
        measured = json.load(f)["memory_per_rank"]
    run = resolve("llama3-tiny", "pretrain", [*overrides, f"trainer.devices={nproc}"])
    plan = plan_memory(run, world_size=nproc, target="cpu")
    per_pp = nproc // plan.layout.pp
    ranks = []
    for rank, m in enumerate(measured):
        r = plan.ranks[rank // per_pp]
        ranks.append({
            "rank": rank,
            "measured_gib": m["peak_bytes"] / GIB,
            "predicted_gib": plan.predicted(r) / GIB,
            "measured_phases_gib": {k: v / GIB for k, v in m["phases_bytes"].items()},
            "predicted_phases_gib": {k: v / GIB for k, v in r.phases.items()},
            "attributable_gib": {k: v / GIB for k, v in m["attributable_bytes"].items()},
            "predicted_parts_gib": {"weights": r.weights / GIB, "gradients": r.gradients / GIB,
                                    "optimizer_state": (r.optimizer_state + r.master_weights) / GIB,
                                    "activations": r.activations / GIB},
        })
    return {"case": name, "nproc": nproc, "layout": plan.layout.label, "parameters": plan.parameters,
            "seconds": time.time() - t0, "ranks": ranks}


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every requested case, in order; the HF checkpoint is written once when a case needs it."""
    names = args.case or list(CASES)
    rows = []
    with tempfile.TemporaryDirectory(prefix="nxdt-plan-") as tmp:
        hf = write_hf_checkpoint(os.path.join(tmp, "hf")) if any(n.startswith("hf-") for n in names) else ""
        for name in names:
            rows.append(measure(name, tmp, hf))
            print(f"done: {name} ({rows[-1]['seconds']:.0f} s)", file=sys.stderr, flush=True)
    return {"machine": describe_machine(), "date": time.strftime("%Y-%m-%d"), "rows": rows}


def report(result: dict[str, Any]) -> str:
    """Markdown tables of a ``run`` result."""
    lines = [f"machine: {result['machine']}, {result['date']}", "",
             "| case | layout | rank | measured peak GiB | predicted GiB | predicted / measured | measured build GiB "
             "| measured train GiB | attributable (params / grads / optim / activations) GiB |",
             "|---|---|---|---:|---:|---:|---:|---:|---|"]
    for row in result["rows"]:
        for r in row["ranks"]:
            ph, at = r["measured_phases_gib"], r["attributable_gib"]
            parts = " / ".join(f"{at.get(k, 0):.2f}" for k in ("parameters", "gradients", "optimizer_state", "activations"))
            lines.append(f"| {row['case']} | {row['layout']} | {r['rank']} | {r['measured_gib']:.3f} | {r['predicted_gib']:.3f} "
                         f"| {r['predicted_gib'] / r['measured_gib']:.3f} | {ph.get('build', 0):.3f} | {ph.get('train', 0):.3f} "
                         f"| {parts} |")
    base = {row["case"]: row for row in result["rows"]}
    pairs = [("tp2-sp", "1proc"), ("pp2", "1proc"), ("hf-tp2-sp", "hf-1proc")]
    if any(a in base and b in base for a, b in pairs):
        lines += ["", "| case | vs | max rank build peak / one process | max rank train peak / one process |", "|---|---|---:|---:|"]
        for a, b in pairs:
            if a in base and b in base:
                def peak(row: dict[str, Any], phase: str) -> float:
                    return max(r["measured_phases_gib"].get(phase, 0) for r in row["ranks"])
                lines.append(f"| {a} | {b} | {peak(base[a], 'build') / peak(base[b], 'build'):.3f} "
                             f"| {peak(base[a], 'train') / peak(base[b], 'train'):.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    result = run(parse_args(argv))
    print(json.dumps(result, indent=2) if parse_args(argv).json else report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
