"""Optimizer-state bytes per rank with and without ZeRO-1 (distributed_strategy.zero1), fp32 and mixed_precision.

The script launches itself under torchrun (gloo, CPU) once per configuration, so every
configuration gets a fresh process and a clean peak-RSS figure. Each rank builds the real
Trainer, takes real optimizer steps, then totals numel * element_size of every tensor the
optimizer holds (storages counted once), split into Adam moments, the master / flat-shard
weight copy, and the fp32 gradient accumulator the flat optimizer keeps for bf16 modes.

    python bench/zero1_memory.py                   # DP=2 and DP=4, fp32 and mixed_precision (~3 min, 2 cores)
    python bench/zero1_memory.py --dp 2 --json     # one DP size, machine-readable
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from typing import Any

import torch
from machine import describe_machine

# Llama shape on top of the llama3-tiny preset: ~3.5M parameters, so optimizer state (tens of
# MB) stands well clear of rounding, while one step still takes well under a second on CPU.
SHAPE = [
    "model.hidden_size=256",
    "model.num_layers=4",
    "model.num_attention_heads=4",
    "model.num_kv_heads=2",
    "model.ffn_hidden_size=768",
    "model.vocab_size=512",
]
PRECISIONS = ("fp32", "mixed_precision")
PARTS = ("moments", "master", "grad_acc")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (``--worker`` is the per-rank mode the launcher uses)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dp", type=int, action="append", help="DP sizes (repeatable; default 2 and 4)")
    p.add_argument("--precision", action="append", choices=PRECISIONS, help="precision types (default both)")
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=2, help="optimizer steps before measuring (>= 1)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--zero1", choices=("true", "false"), help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# -- per rank ------------------------------------------------------------------------------------
def proc_status_kib(field: str) -> int:
    """A ``/proc/self/status`` memory field (VmRSS, VmHWM) in KiB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes of ``t``'s elements."""
    return t.numel() * t.element_size()


def optimizer_bytes(optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> dict[str, int]:
    """Bytes the optimizer holds, by kind; each storage counted once, model parameters not at all."""
    model_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: set[int] = set()
    out = dict.fromkeys(PARTS, 0)

    def add(kind: str, t: Any) -> None:
        if not isinstance(t, torch.Tensor):
            return
        ptr = t.untyped_storage().data_ptr()
        if ptr in model_storages or ptr in seen:
            return
        seen.add(ptr)
        out[kind] += tensor_bytes(t)

    for state in optimizer.state.values():
        for value in state.values():  # exp_avg, exp_avg_sq and the (scalar) step of torch's AdamW
            add("moments", value)
    for group in optimizer.param_groups:
        for p in group["params"]:
            # torch AdamW's params are the model's own (skipped); the flat optimizer's are its copies.
            add("master", p)
    for flat in getattr(optimizer, "flat_groups", []):
        add("grad_acc", flat.grad_acc)
    return out


def worker(args: argparse.Namespace) -> None:
    """One rank: build the Trainer, take ``steps`` real steps, measure, and gather to rank 0."""
    import torch.distributed as dist

    from nxdt.parallel.world import init_world
    from nxdt.resolve import resolve
    from nxdt.train.trainer import Trainer

    world = init_world("cpu")
    dp = world.world_size
    rss_before = proc_status_kib("VmRSS")
    overrides = [
        *SHAPE,
        f"data.seq_length={args.seq}",
        f"model.encoder_seq_length={args.seq}",
        f"data.micro_batch_size={args.micro_batch}",
        f"data.global_batch_size={args.micro_batch * dp}",
        "trainer.max_steps=100",
        f"precision.type={args.precision[0]}",
        f"distributed_strategy.zero1={args.zero1}",
        f"exp_manager.explicit_log_dir={os.path.dirname(args.out)}/run",
        "exp_manager.create_tensorboard_logger=false",
        "exp_manager.create_checkpoint_callback=false",
    ]
    trainer = Trainer(resolve("llama3-tiny", "pretrain", overrides), world)
    trainer.setup()
    # Each rank its own tokens, as a DP rank would get; labels are the next tokens.
    gen = torch.Generator().manual_seed(1000 + world.rank)
    tokens = torch.randint(0, trainer.run.arch.vocab_size, (args.micro_batch, args.seq + 1), generator=gen)
    batches = [{"input_ids": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous()}]
    losses = [trainer.train_step(batches)["loss"] for _ in range(args.steps)]
    module = trainer.model.trainable_module
    result = {
        "rank": world.rank,
        "bytes": optimizer_bytes(trainer.optimizer, module),
        "optimizer": type(trainer.optimizer).__name__,
        "params": sum(p.numel() for p in module.parameters()),
        "param_bytes": sum(tensor_bytes(p) for p in module.parameters()),
        "losses": losses,
        "peak_rss_delta_kib": proc_status_kib("VmHWM") - rss_before,
    }
    gathered: list[Any] = [None] * dp
    dist.all_gather_object(gathered, result)
    if world.rank == 0:
        with open(args.out + ".tmp", "w") as f:
            json.dump(gathered, f)
        os.replace(args.out + ".tmp", args.out)  # whole or absent, never half-written
    dist.barrier()
    dist.destroy_process_group()


# -- launcher ------------------------------------------------------------------------------------
def launch(args: argparse.Namespace, dp: int, precision: str, zero1: bool, tmp: str) -> list[dict[str, Any]]:
    """Run one configuration under torchrun; the per-rank results."""
    out = os.path.join(tmp, f"dp{dp}-{precision}-zero1_{zero1}", "result.json")
    os.makedirs(os.path.dirname(out))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={dp}",
        __file__,
        "--worker",
        f"--precision={precision}",
        f"--zero1={str(zero1).lower()}",
        f"--out={out}",
        f"--seq={args.seq}",
        f"--micro-batch={args.micro_batch}",
        f"--steps={args.steps}",
    ]
    # One thread per rank: up to 4 ranks share 2 cores; memory does not depend on it.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for _attempt in range(3):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        # Rank 0 writes the gathered results before teardown; a rank aborting while gloo shuts
        # down (seen on a loaded 2-core box) does not touch measurements that already arrived.
        if os.path.exists(out):
            if proc.returncode != 0:
                print(
                    f"note: {os.path.basename(os.path.dirname(out))}: exit {proc.returncode} after the "
                    "results were written (teardown)",
                    file=sys.stderr,
                )
            with open(out) as f:
                return json.load(f)
    raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every (DP, precision) pair with zero1 off and on; per-rank maxima and on/off ratios."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="nxdt-zero1-") as tmp:
        for dp in args.dp or [2, 4]:
            for precision in args.precision or PRECISIONS:
                side = {}
                for zero1 in (False, True):
                    ranks = launch(args, dp, precision, zero1, tmp)
                    # The most loaded rank is what has to fit; ZeRO-1 shards are padded to equal size.
                    per_part = {k: max(r["bytes"][k] for r in ranks) for k in PARTS}
                    side[zero1] = {
                        "optimizer": ranks[0]["optimizer"],
                        "bytes": per_part,
                        "state": per_part["moments"] + per_part["master"],
                        "held": sum(per_part.values()),
                        "peak_rss_delta_mib": max(r["peak_rss_delta_kib"] for r in ranks) / 1024,
                        "losses": ranks[0]["losses"],
                        "params": ranks[0]["params"],
                        "param_bytes": ranks[0]["param_bytes"],
                    }
                rows.append(
                    {
                        "dp": dp,
                        "precision": precision,
                        "off": side[False],
                        "on": side[True],
                        "ratio_state": side[True]["state"] / side[False]["state"],
                        "ratio_held": side[True]["held"] / side[False]["held"],
                    }
                )
    return {
        "machine": describe_machine(),
        "config": {"shape": SHAPE, "seq": args.seq, "micro_batch": args.micro_batch, "steps": args.steps},
        "rows": rows,
    }


def report(result: dict[str, Any]) -> str:
    """Markdown table of a ``run`` result."""
    mib = 1 / 2**20
    first = result["rows"][0]["off"]
    lines = [
        f"machine: {result['machine']}",
        f"model: llama3-tiny + {' '.join(result['config']['shape'])}; {first['params']:,} parameters; "
        f"seq {result['config']['seq']}, micro-batch {result['config']['micro_batch']} per rank, "
        f"measured after {result['config']['steps']} optimizer steps",
        "",
        "| DP | precision | zero1 | optimizer | Adam moments MiB | master/shard copy MiB | state MiB "
        "| fp32 grad acc MiB | peak RSS delta MiB | last loss |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        for key in ("off", "on"):
            s = row[key]
            b = s["bytes"]
            lines.append(
                f"| {row['dp']} | {row['precision']} | {'on' if key == 'on' else 'off'} | {s['optimizer']} "
                f"| {b['moments'] * mib:.2f} | {b['master'] * mib:.2f} | {s['state'] * mib:.2f} "
                f"| {b['grad_acc'] * mib:.2f} | {s['peak_rss_delta_mib']:.1f} | {s['losses'][-1]:.5f} |"
            )
    lines += [
        "",
        "| DP | precision | state on/off | 1/DP | state + grad acc on/off |",
        "|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        lines.append(
            f"| {row['dp']} | {row['precision']} | {row['ratio_state']:.3f} | {1 / row['dp']:.3f} "
            f"| {row['ratio_held']:.3f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point: the launcher, or one rank when started with ``--worker``."""
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    result = run(args)
    print(json.dumps(result, indent=2) if args.json else report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
