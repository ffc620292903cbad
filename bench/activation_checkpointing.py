"""Activation memory saved by full and selective activation checkpointing, and what the recompute costs.

One process builds three Trainers from the same seed: no checkpointing,
``model.activations_checkpoint_granularity=full`` and ``selective`` with
``model.activations_checkpoint_recompute=[CoreAttention]``. Activation memory is the bytes of the
tensors autograd saves for backward during one forward + loss, totalled by a
``torch.autograd.graph.saved_tensors_hooks`` pack hook (each storage counted once, parameters and
buffers left out). It is exact and deterministic: inside a checkpointed region torch's own hook
takes over, so only what checkpointing really keeps (the region inputs) reaches ours. Step time
is the median of interleaved rounds of ``Trainer.train_step``.

    python bench/activation_checkpointing.py                        # hidden 128, 4 layers, seq 512, mb 4 (~1 min)
    python bench/activation_checkpointing.py --attention-backend math   # attention that keeps the S x S scores
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Any

import torch
from machine import describe_machine
from torch.nn.attention import SDPBackend, sdpa_kernel

MODES: dict[str, list[str]] = {
    "none": [],
    "full": ["model.activations_checkpoint_granularity=full"],
    "selective": [
        "model.activations_checkpoint_granularity=selective",
        "model.activations_checkpoint_recompute=[CoreAttention]",
    ],
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument(
        "--attention-backend",
        choices=("default", "math"),
        default="default",
        help="math: SDPA's reference kernel, which saves the softmax probabilities",
    )
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per mode")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds of one timed step per mode")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    return p.parse_args(argv)


def build(args: argparse.Namespace, mode: str, log_dir: str) -> Any:
    """A Trainer for ``mode``; every mode initialises the same weights from the same seed."""
    from nxdt.parallel.world import init_world
    from nxdt.resolve import resolve
    from nxdt.train.trainer import Trainer

    overrides = [
        f"model.hidden_size={args.hidden}",
        f"model.num_layers={args.layers}",
        f"model.ffn_hidden_size={3 * args.hidden}",
        f"model.max_position_embeddings={max(args.seq, 256)}",
        f"data.seq_length={args.seq}",
        f"model.encoder_seq_length={args.seq}",
        f"data.micro_batch_size={args.micro_batch}",
        f"data.global_batch_size={args.micro_batch}",
        "trainer.max_steps=1000",
        "precision.type=fp32",
        f"exp_manager.explicit_log_dir={log_dir}/{mode}",
        "exp_manager.create_tensorboard_logger=false",
        "exp_manager.create_checkpoint_callback=false",
        *MODES[mode],
    ]
    trainer = Trainer(resolve("llama3-tiny", "pretrain", overrides), init_world("cpu"))
    trainer.setup()
    return trainer


def saved_activation_bytes(trainer: Any, batch: dict[str, torch.Tensor]) -> tuple[int, int, float]:
    """(bytes, storages) saved for backward by one forward + loss, and that loss."""
    module = trainer.model.trainable_module
    # Weights saved by matmuls exist anyway: they are not activation memory.
    excluded = {t.untyped_storage().data_ptr() for t in [*module.parameters(), *module.buffers()]}
    saved: dict[int, torch.UntypedStorage] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        # A view keeps its whole storage alive, so the storage is what counts, once.
        if storage.data_ptr() not in excluded:
            saved[storage.data_ptr()] = storage
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = trainer.model(batch["input_ids"])
        loss, _ = trainer.model.compute_loss(trainer.loss_fn, logits, batch)
    total = sum(s.nbytes() for s in saved.values())
    value = float(loss.detach()) / batch["labels"].numel()
    del logits, loss  # frees the graph without a backward
    return total, len(saved), value


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Build the three modes, measure saved bytes, then time interleaved train steps."""
    torch.set_num_threads(args.threads)
    backend = sdpa_kernel(SDPBackend.MATH) if args.attention_backend == "math" else contextlib.nullcontext()
    log_dir = tempfile.TemporaryDirectory(prefix="nxdt-ac-")
    trainers = {mode: build(args, mode, log_dir.name) for mode in MODES}
    gen = torch.Generator().manual_seed(1234)
    vocab = trainers["none"].run.arch.vocab_size
    tokens = torch.randint(0, vocab, (args.micro_batch, args.seq + 1), generator=gen)
    batch = {"input_ids": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous()}
    memory, times = {}, {m: [] for m in MODES}
    with backend:
        for mode, trainer in trainers.items():
            memory[mode] = dict(zip(("bytes", "storages", "loss"), saved_activation_bytes(trainer, batch)))
        for trainer in trainers.values():
            for _ in range(args.warmup):
                trainer.train_step([batch])
        modes = list(MODES)
        for r in range(args.rounds):
            # Rotating the order spreads load from other processes over all modes alike.
            for mode in modes[r % 3 :] + modes[: r % 3]:
                t0 = time.perf_counter()
                trainers[mode].train_step([batch])
                times[mode].append(time.perf_counter() - t0)
    log_dir.cleanup()
    step_s = {m: statistics.median(v) for m, v in times.items()}
    paired = {m: statistics.median(a / b for a, b in zip(times[m], times["none"])) for m in MODES}
    return {
        "machine": describe_machine(),
        "config": {k: v for k, v in vars(args).items() if k != "json"},
        "params": sum(p.numel() for p in trainers["none"].model.trainable_module.parameters()),
        "memory": memory,
        "step_s": step_s,
        "step_s_rounds": times,
        "time_ratio_paired_median": paired,
    }


def report(result: dict[str, Any]) -> str:
    """Markdown table of a ``run`` result."""
    cfg, mem, base = result["config"], result["memory"], result["memory"]["none"]["bytes"]
    lines = [
        f"machine: {result['machine']}",
        f"model: llama3-tiny, hidden {cfg['hidden']}, {cfg['layers']} layers, {result['params']:,} parameters; "
        f"seq {cfg['seq']}, micro-batch {cfg['micro_batch']}, fp32, attention backend {cfg['attention_backend']}, "
        f"threads {cfg['threads']}, {cfg['rounds']} interleaved rounds",
        "",
        "| mode | saved for backward MiB | storages | vs none | saved | median step s | step time vs none | loss |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for mode, m in mem.items():
        lines.append(
            f"| {mode} | {m['bytes'] / 2**20:.2f} | {m['storages']} | {m['bytes'] / base:.3f} "
            f"| {(base - m['bytes']) / 2**20:.2f} MiB | {result['step_s'][mode]:.3f} "
            f"| {result['time_ratio_paired_median'][mode]:.3f} | {m['loss']:.6f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    args = parse_args(argv)
    result = run(args)
    print(json.dumps(result, indent=2) if args.json else report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
