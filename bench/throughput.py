"""Training throughput of nxdt's Trainer.train_step against a plain PyTorch loop and a transformers loop.

All three sides train the same Llama from identical weights on the same pre-made token batches,
with the same AdamW settings, clipping, accumulation and precision. Sides run in interleaved
rounds (their order rotating each round) so that load from other processes hits all of them alike;
the report gives median tokens/s per side and the ratios of nxdt to the other two.

    python bench/throughput.py                      # tiny llama, fp32, CPU (~1 min on 2 cores)
    python bench/throughput.py --precision autocast # bf16 autocast
    python bench/throughput.py --device cuda --preset llama-1b --precision autocast  # also reports MFU
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import cProfile
import io
import json
import os
import pstats
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from machine import describe_machine

# Architecture overrides on top of the llama3-tiny preset, in NxDT `model.*` keys.
PRESETS: dict[str, list[str]] = {
    "tiny": [],
    # Llama-3.2-1B shape (1.24B parameters, tied embeddings).
    "llama-1b": [
        "model.vocab_size=128256",
        "model.hidden_size=2048",
        "model.num_layers=16",
        "model.num_attention_heads=32",
        "model.num_kv_heads=8",
        "model.ffn_hidden_size=8192",
        "model.max_position_embeddings=2048",
        "model.rope_theta=500000.0",
        "model.share_embeddings_and_output_weights=true",
    ],
}
DEFAULT_SEQ = {"tiny": 128, "llama-1b": 2048}
SIDES = ("nxdt", "plain", "hf")
StepFn = Callable[[list[dict[str, torch.Tensor]]], Any]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="model size (overrides of llama3-tiny)")
    p.add_argument("--override", action="append", default=[], help="extra nxdt override KEY=VALUE (repeatable)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--precision", choices=("fp32", "autocast"), default="fp32", help="autocast = bf16 autocast")
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=None, help="sequence length (default: 128 tiny, 2048 llama-1b)")
    p.add_argument("--grad-accum", type=int, default=2, help="micro-batches per optimizer step (all sides)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps per side before the first round")
    p.add_argument("--steps", type=int, default=5, help="timed optimizer steps per side per round")
    p.add_argument("--rounds", type=int, default=15, help="interleaved rounds")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads")
    p.add_argument("--peak-tflops", type=float, default=None, help="accelerator peak for MFU (default: known GPUs)")
    p.add_argument("--profile", action="store_true", help="also cProfile nxdt and plain steps and print the top")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    return p.parse_args(argv)


# -- the three sides -----------------------------------------------------------------------------
def build_nxdt(args: argparse.Namespace, log_dir: str) -> Any:
    """An nxdt Trainer set up for the benchmark's batch shape and precision."""
    from nxdt.parallel.world import init_world
    from nxdt.resolve import resolve
    from nxdt.train.trainer import Trainer

    overrides = [
        *PRESETS[args.preset],
        f"data.seq_length={args.seq}",
        f"model.encoder_seq_length={args.seq}",
        f"data.micro_batch_size={args.micro_batch}",
        f"data.global_batch_size={args.micro_batch * args.grad_accum}",
        "trainer.max_steps=1000000",  # the scheduler must not run out during the benchmark
        "trainer.gradient_clip_val=1.0",
        f"precision.type={args.precision}",
        f"exp_manager.explicit_log_dir={log_dir}",
        "exp_manager.create_tensorboard_logger=false",
        "exp_manager.create_checkpoint_callback=false",
        *args.override,
    ]
    run = resolve("llama3-tiny", "pretrain", overrides)
    trainer = Trainer(run, init_world(args.device))
    # The real set-up (embedded data included); the timed steps then use the fixed batches below.
    trainer.setup()
    return trainer


def same_adamw(params: Any, reference: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """AdamW with ``reference``'s hyper-parameters and its decay / no-decay split (1-D tensors undecayed)."""
    params = list(params)
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": reference.param_groups[0]["weight_decay"]},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": reference.param_groups[-1]["weight_decay"]},
    ]
    d = reference.defaults
    # foreach on CPU, fused on CUDA: whatever nxdt picked, so the update kernels are the same.
    impl = {"fused": True} if d.get("fused") else {"foreach": True}
    return torch.optim.AdamW(groups, lr=d["lr"], betas=d["betas"], eps=d["eps"], **impl)


def manual_step_fn(forward: Callable[[torch.Tensor], torch.Tensor], module: torch.nn.Module,
                   optimizer: torch.optim.Optimizer, device: str, autocast: bool) -> StepFn:
    """A minimal training step: forward, CE, backward per micro-batch; clip, step, zero_grad."""
    params = [p for p in module.parameters() if p.requires_grad]
    amp = (lambda: torch.autocast(device, dtype=torch.bfloat16)) if autocast else contextlib.nullcontext

    def step(micro_batches: list[dict[str, torch.Tensor]]) -> None:
        for mb in micro_batches:
            with amp():
                logits = forward(mb["input_ids"])
                loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), mb["labels"].reshape(-1))
            (loss / len(micro_batches)).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def build_hf(trainer: Any) -> torch.nn.Module:
    """transformers LlamaForCausalLM of the same architecture, holding nxdt's initial weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    spec, arch = trainer.run.spec, trainer.run.arch
    # use_cache=False: a training loop has no use for the KV cache HF would otherwise allocate.
    hf_cfg = LlamaConfig(**{**spec.config_to_hf(arch), "use_cache": False})
    hf_cfg._attn_implementation = "sdpa"  # the same fused attention kernel nxdt calls
    device = trainer.world.device
    with torch.device(device):
        model = LlamaForCausalLM(hf_cfg)
    state = spec.state_dict_adapter(arch).to_hf(trainer.model.trainable_module.state_dict())
    missing, unexpected = model.load_state_dict(state, strict=False)
    # A tied lm_head is not in the converted dict; HF fills it from the embedding.
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise RuntimeError(f"HF weight copy failed: missing={missing} unexpected={unexpected}")
    model.train()
    return model


# -- measurement -----------------------------------------------------------------------------------
def make_batches(args: argparse.Namespace, vocab: int, device: torch.device) -> list[dict[str, torch.Tensor]]:
    """One step's micro-batches of random tokens, with labels already shifted (labels[t] = token t+1)."""
    gen = torch.Generator().manual_seed(1234)
    batches = []
    for _ in range(args.grad_accum):
        tokens = torch.randint(0, vocab, (args.micro_batch, args.seq + 1), generator=gen)
        batches.append({"input_ids": tokens[:, :-1].contiguous().to(device),
                        "labels": tokens[:, 1:].contiguous().to(device)})
    return batches


def sync(device: torch.device) -> None:
    """Wait for queued device work so timings cover it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step: StepFn, batches: list[dict[str, torch.Tensor]], n: int, device: torch.device) -> float:
    """Seconds for ``n`` optimizer steps on ``batches``."""
    sync(device)
    t0 = time.perf_counter()
    for _ in range(n):
        step(batches)
    sync(device)
    return time.perf_counter() - t0


@torch.no_grad()
def initial_losses(forwards: dict[str, Callable[[torch.Tensor], torch.Tensor]],
                   batch: dict[str, torch.Tensor]) -> dict[str, float]:
    """Each side's fp32 loss on one micro-batch before training: equal when weights and math agree."""
    return {name: float(F.cross_entropy(fwd(batch["input_ids"]).flatten(0, 1).float(), batch["labels"].flatten()))
            for name, fwd in forwards.items()}


def profile_steps(steps: dict[str, StepFn], batches: list[dict[str, torch.Tensor]], n: int) -> str:
    """cProfile ``n`` steps of each side; the top functions by own time."""
    out = io.StringIO()
    for name, step in steps.items():
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(n):
            step(batches)
        prof.disable()
        out.write(f"\n=== {name}: {n} steps, top 15 by tottime ===\n")
        pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(15)
    return out.getvalue()


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Build the three sides, measure them in interleaved rounds, and summarise."""
    torch.set_num_threads(args.threads)
    args.seq = args.seq or DEFAULT_SEQ[args.preset]
    log_dir = tempfile.TemporaryDirectory(prefix="nxdt-bench-")
    trainer = build_nxdt(args, log_dir.name)
    device = trainer.world.device
    autocast = args.precision == "autocast"

    plain_model = copy.deepcopy(trainer.model.trainable_module)  # deepcopy keeps a tied output weight tied
    hf_model = build_hf(trainer)
    steps: dict[str, StepFn] = {
        "nxdt": trainer.train_step,
        "plain": manual_step_fn(plain_model, plain_model, same_adamw(plain_model.parameters(), trainer.optimizer),
                                device.type, autocast),
        "hf": manual_step_fn(lambda ids: hf_model(input_ids=ids).logits, hf_model,
                             same_adamw(hf_model.parameters(), trainer.optimizer), device.type, autocast),
    }
    batches = make_batches(args, trainer.run.arch.vocab_size, device)
    losses = initial_losses({"nxdt": trainer.model.trainable_module, "plain": plain_model,
                             "hf": lambda ids: hf_model(input_ids=ids).logits}, batches[0])

    for step in steps.values():
        for _ in range(args.warmup):
            step(batches)
    tokens_per_round = args.steps * args.grad_accum * args.micro_batch * args.seq
    rates: dict[str, list[float]] = {s: [] for s in SIDES}
    for r in range(args.rounds):
        # Rotating the order keeps any first/last-in-round effect (caches, boost clocks) off one side.
        for side in SIDES[r % 3:] + SIDES[:r % 3]:
            rates[side].append(tokens_per_round / time_steps(steps[side], batches, args.steps, device))

    median = {s: statistics.median(v) for s, v in rates.items()}
    paired = {o: statistics.median(n / b for n, b in zip(rates["nxdt"], rates[o], strict=True)) for o in ("plain", "hf")}
    result: dict[str, Any] = {
        "machine": describe_machine(),
        "config": {k: v for k, v in vars(args).items() if k not in ("json", "profile")},
        "initial_loss": losses,
        "tokens_per_s": {s: {"median": median[s], "min": min(v), "max": max(v), "rounds": v} for s, v in rates.items()},
        "ratio": {"nxdt/plain": median["nxdt"] / median["plain"], "nxdt/hf": median["nxdt"] / median["hf"]},
        "ratio_paired_median": {f"nxdt/{o}": v for o, v in paired.items()},
        "target": {"nxdt/plain": 0.97, "nxdt/hf": 1.0},
    }
    from nxdt.train.trainer import _peak_flops

    peak = args.peak_tflops * 1e12 if args.peak_tflops else _peak_flops(device)
    if peak:
        fpt = trainer.run.spec.flops_per_token(trainer.run.arch, args.seq)
        result["mfu"] = {s: fpt * median[s] / peak for s in SIDES}
    if args.profile:
        result["profile"] = profile_steps({"nxdt": steps["nxdt"], "plain": steps["plain"]}, batches, args.steps)
    log_dir.cleanup()
    return result


def report(result: dict[str, Any]) -> str:
    """Human-readable table of a ``run`` result."""
    cfg, tps = result["config"], result["tokens_per_s"]
    lines = [
        f"machine: {result['machine']}",
        f"config: preset={cfg['preset']} device={cfg['device']} precision={cfg['precision']} "
        f"micro_batch={cfg['micro_batch']} seq={cfg['seq']} grad_accum={cfg['grad_accum']} threads={cfg['threads']} "
        f"warmup={cfg['warmup']} steps/round={cfg['steps']} rounds={cfg['rounds']}",
        "initial loss: " + ", ".join(f"{k}={v:.5f}" for k, v in result["initial_loss"].items()),
        "",
        f"{'side':<6} {'median tok/s':>13} {'min':>10} {'max':>10}" + ("    MFU" if "mfu" in result else ""),
    ]
    for side in SIDES:
        row = f"{side:<6} {tps[side]['median']:>13.0f} {tps[side]['min']:>10.0f} {tps[side]['max']:>10.0f}"
        lines.append(row + (f" {result['mfu'][side]:>6.1%}" if "mfu" in result else ""))
    lines.append("")
    for key, target in result["target"].items():
        got, paired = result["ratio"][key], result["ratio_paired_median"][key]
        verdict = "meets" if got >= target else "BELOW"
        lines.append(f"{key}: {got:.3f}x (median of per-round ratios {paired:.3f}x); target >= {target} -> {verdict}")
    if "profile" in result:
        lines.append(result["profile"])
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    args = parse_args(argv)
    result = run(args)
    print(json.dumps(result, indent=2) if args.json else report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
