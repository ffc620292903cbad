"""Training tokens/s of any family's preset: nxdt's Trainer.train_step next to a transformers loop.

Both sides train the same model from identical weights on the same batches (the recipe's own
first global batch, masks and all), with the same AdamW settings, clipping, accumulation and
precision. The transformers side is the architecture the family exports to (``config_to_hf``,
``state_dict_adapter``), so any family with an HF form can be measured: gpt2-tiny today, bert-tiny
once its plugin lands. Sides run in interleaved rounds (order alternating) so load from other
processes falls on both alike; the report gives median tokens/s with min/max and the ratios.

    python bench/family_throughput.py gpt2-tiny                 # fp32, CPU, pre-training recipe
    python bench/family_throughput.py gpt2-tiny --threads 1     # steadier on a shared machine
    python bench/family_throughput.py bert-tiny --json          # machine-readable, per-round rates included
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from machine import describe_machine
from throughput import same_adamw, time_steps

SIDES = ("nxdt", "hf")
StepFn = Callable[[list[dict[str, torch.Tensor]]], Any]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("preset", help="an installed preset whose family has an HF form (gpt2-tiny, bert-tiny, ...)")
    p.add_argument("--recipe", default="pretrain", help="the recipe whose data and objective are trained")
    p.add_argument("--override", action="append", default=[], help="extra nxdt override KEY=VALUE (repeatable)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--precision", choices=("fp32", "autocast"), default="fp32", help="autocast = bf16 autocast")
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--grad-accum", type=int, default=2, help="micro-batches per optimizer step (both sides)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps per side before the first round")
    p.add_argument("--steps", type=int, default=5, help="timed optimizer steps per side per round")
    p.add_argument("--rounds", type=int, default=15, help="interleaved rounds")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    return p.parse_args(argv)


def build_nxdt(args: argparse.Namespace, log_dir: str) -> Any:
    """An nxdt Trainer of ``args.preset`` set up for the benchmark's batch shape and precision."""
    from nxdt.parallel.world import init_world
    from nxdt.resolve import resolve
    from nxdt.train.trainer import Trainer

    overrides = [
        f"data.seq_length={args.seq}",
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
    trainer = Trainer(resolve(args.preset, args.recipe, overrides), init_world(args.device))
    trainer.setup()
    return trainer


def build_hf(trainer: Any) -> torch.nn.Module:
    """The transformers model the family exports to, holding nxdt's initial weights, in training mode."""
    import transformers

    from nxdt.testing.conformance import load_into_hf

    spec, arch = trainer.run.spec, trainer.run.arch
    hf_dict = dict(spec.config_to_hf(arch))
    architecture = (hf_dict.get("architectures") or [spec.hf_architecture])[0]
    model_type = hf_dict.pop("model_type", None) or spec.hf_model_types[0]
    # use_cache=False: a training loop has no use for the KV cache HF would otherwise keep.
    config = transformers.AutoConfig.for_model(model_type, **{**hf_dict, "use_cache": False})
    with torch.device(trainer.world.device):
        # sdpa: the fused attention kernel nxdt calls too
        model = getattr(transformers, architecture)._from_config(config, attn_implementation="sdpa")
    load_into_hf(model, spec.state_dict_adapter(arch).to_hf(trainer.model.trainable_module.state_dict()))
    return model.train()


def hf_step_fn(model: torch.nn.Module, optimizer: torch.optim.Optimizer, inputs: tuple[str, ...],
               device: str, autocast: bool) -> StepFn:
    """A transformers training step with nxdt's loss: token-summed CE / the step's label count, clip, AdamW."""
    params = [p for p in model.parameters() if p.requires_grad]
    amp = (lambda: torch.autocast(device, dtype=torch.bfloat16)) if autocast else contextlib.nullcontext

    def step(micro_batches: list[dict[str, torch.Tensor]]) -> None:
        total = sum((mb["labels"] != -100).sum() for mb in micro_batches)
        for mb in micro_batches:
            with amp():
                logits = model(**{k: mb[k] for k in inputs if k in mb}).logits
                loss = F.cross_entropy(logits.flatten(0, 1).float(), mb["labels"].flatten(), reduction="sum")
            (loss / total).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


@torch.no_grad()
def initial_losses(trainer: Any, hf: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Both sides' fp32 loss on one micro-batch before training: equal when weights and math agree."""
    from nxdt.recipes.losses import logits_of

    inputs = {k: batch[k] for k in trainer.run.spec.inputs if k in batch}
    out = {}
    for name, module in (("nxdt", trainer.model.trainable_module), ("hf", hf)):
        logits = logits_of(module(**inputs)).float()
        out[name] = float(F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten()))
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Build both sides, measure them in interleaved rounds, and summarise."""
    torch.set_num_threads(args.threads)
    log_dir = tempfile.TemporaryDirectory(prefix="nxdt-bench-")
    trainer = build_nxdt(args, log_dir.name)
    device = trainer.world.device
    hf = build_hf(trainer)
    # One real global batch of the recipe, as the trainer feeds it (positions / masks the model takes).
    batches = next(trainer.data.train_steps(0))
    losses = initial_losses(trainer, hf, batches[0])
    steps: dict[str, StepFn] = {
        "nxdt": trainer.train_step,
        "hf": hf_step_fn(hf, same_adamw(hf.parameters(), trainer.optimizer), tuple(trainer.run.spec.inputs),
                         device.type, args.precision == "autocast"),
    }
    for step in steps.values():
        for _ in range(args.warmup):
            step(batches)
    tokens_per_round = args.steps * sum(mb["input_ids"].numel() for mb in batches)
    rates: dict[str, list[float]] = {s: [] for s in SIDES}
    for r in range(args.rounds):
        # Alternating the order keeps any first/last-in-round effect off one side.
        for side in SIDES if r % 2 == 0 else SIDES[::-1]:
            rates[side].append(tokens_per_round / time_steps(steps[side], batches, args.steps, device))
    median = {s: statistics.median(v) for s, v in rates.items()}
    result = {
        "machine": describe_machine(),
        "config": {k: v for k, v in vars(args).items() if k != "json"},
        "model": {"family": trainer.run.family, "hf": type(hf).__name__,
                  "parameters": sum(p.numel() for p in trainer.model.trainable_module.parameters())},
        "initial_loss": losses,
        "tokens_per_s": {s: {"median": median[s], "min": min(v), "max": max(v), "rounds": v} for s, v in rates.items()},
        "ratio": {"nxdt/hf": median["nxdt"] / median["hf"]},
        "ratio_paired_median": {"nxdt/hf": statistics.median(n / h for n, h in zip(rates["nxdt"], rates["hf"]))},
        "target": {"nxdt/hf": 1.0},
    }
    log_dir.cleanup()
    return result


def report(result: dict[str, Any]) -> str:
    """Human-readable table of a ``run`` result."""
    cfg, tps, model = result["config"], result["tokens_per_s"], result["model"]
    lines = [
        f"machine: {result['machine']}",
        f"model: {cfg['preset']} ({model['family']}, {model['parameters']:,} parameters) vs transformers {model['hf']}",
        f"config: recipe={cfg['recipe']} device={cfg['device']} precision={cfg['precision']} "
        f"micro_batch={cfg['micro_batch']} seq={cfg['seq']} grad_accum={cfg['grad_accum']} threads={cfg['threads']} "
        f"warmup={cfg['warmup']} steps/round={cfg['steps']} rounds={cfg['rounds']}",
        "initial loss: " + ", ".join(f"{k}={v:.5f}" for k, v in result["initial_loss"].items()),
        "",
        f"{'side':<6} {'median tok/s':>13} {'min':>10} {'max':>10}",
    ]
    for side in SIDES:
        lines.append(f"{side:<6} {tps[side]['median']:>13.0f} {tps[side]['min']:>10.0f} {tps[side]['max']:>10.0f}")
    got, paired = result["ratio"]["nxdt/hf"], result["ratio_paired_median"]["nxdt/hf"]
    target = result["target"]["nxdt/hf"]
    lines += ["", f"nxdt/hf: {got:.3f}x (median of per-round ratios {paired:.3f}x); target >= {target} -> "
              f"{'meets' if got >= target else 'BELOW'}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    args = parse_args(argv)
    result = run(args)
    print(json.dumps(result, indent=2) if args.json else report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
