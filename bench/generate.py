"""Decoding tokens/s: nxdt with its KV cache, nxdt recomputing every step, and transformers' `generate`.

One Llama (llama3-tiny reshaped by ``--preset``) with the same weights on every side: nxdt's model,
and the transformers model loaded from an `nxdt export`-style directory of those weights. Each side
decodes ``--new-tokens`` greedy tokens (128 by default; EOS never stops it) after a ``--prompt-len``
prompt, for ``--batch`` prompts. Sides run in interleaved rounds, their order rotating; the report
gives median tokens/s with min/max and the ratios of nxdt's cached decoding to the other two. All
sides must produce the same tokens.

    python bench/generate.py                    # ~1 min on 2 cores
    python bench/generate.py --threads 1        # steadier on a shared machine
    python bench/generate.py --preset small --batch 8 --json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from machine import describe_machine

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {},  # llama3-tiny: hidden 128, 4 layers, 4 heads / 2 KV heads, vocab 512
    "small": {"hidden_size": 512, "num_layers": 8, "num_attention_heads": 8, "num_kv_heads": 2,
              "ffn_hidden_size": 1408, "vocab_size": 8192, "max_position_embeddings": 1024},
}
SIDES = ("nxdt_cache", "nxdt_recompute", "hf_generate")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="small")
    p.add_argument("--batch", type=int, default=1, help="prompts decoded together")
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--json", action="store_true")
    return p.parse_args(argv)


def build(args: argparse.Namespace, directory: Path) -> tuple[Any, Any, Any]:
    """(nxdt model, transformers model from the exported weights, the architecture config)."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from nxdt.resolve import resolve
    from nxdt.testing.conformance import _perturb, build_initialized

    run = resolve("llama3-tiny", overrides=[f"model.{k}={v}" for k, v in PRESETS[args.preset].items()])
    spec, arch = run.spec, run.arch
    model = build_initialized(spec, arch, seed=0).eval()
    _perturb(model, 0)  # sharper logits than init: no argmax near-ties between the sides' kernels
    state = {k: v.detach().clone().contiguous() for k, v in spec.state_dict_adapter(arch).to_hf(model.state_dict()).items()}
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(spec.config_to_hf(arch)))
    hf = AutoModelForCausalLM.from_pretrained(directory, attn_implementation="sdpa").float().eval()
    return model, hf, arch


def sides(model: Any, hf: Any, args: argparse.Namespace, never: int) -> dict[str, Any]:
    """Each side as prompts -> new tokens [batch, new_tokens] (``never`` is an id no model emits: no early stop)."""
    from nxdt.generation import generate

    def nxdt(use_cache: bool):
        def decode(prompts: torch.Tensor) -> torch.Tensor:
            rows = generate(model, prompts.tolist(), args.new_tokens, [never], 0, use_cache=use_cache)
            return torch.tensor(rows)
        return decode

    @torch.no_grad()
    def hf_generate(prompts: torch.Tensor) -> torch.Tensor:
        out = hf.generate(prompts, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                          eos_token_id=None, pad_token_id=0)
        return out[:, prompts.shape[1]:]

    return {"nxdt_cache": nxdt(True), "nxdt_recompute": nxdt(False), "hf_generate": hf_generate}


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Build the sides, check they agree, time interleaved rounds, summarise."""
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="nxdt-bench-gen-") as tmp:
        model, hf, arch = build(args, Path(tmp))
        prompts = torch.randint(3, arch.vocab_size, (args.batch, args.prompt_len), generator=torch.Generator().manual_seed(0))
        fns = sides(model, hf, args, never=arch.vocab_size)
        outputs = {name: fn(prompts) for name, fn in fns.items()}  # also the warm-up
        agree = {name: bool(torch.equal(out, outputs["nxdt_cache"])) for name, out in outputs.items()}
        rates: dict[str, list[float]] = {s: [] for s in SIDES}
        tokens = args.batch * args.new_tokens
        for r in range(args.rounds):
            for side in SIDES[r % 3:] + SIDES[:r % 3]:
                t0 = time.perf_counter()
                fns[side](prompts)
                rates[side].append(tokens / (time.perf_counter() - t0))
    median = {s: statistics.median(v) for s, v in rates.items()}
    return {
        "machine": describe_machine(),
        "config": {k: v for k, v in vars(args).items() if k != "json"},
        "same_tokens_as_nxdt_cache": agree,
        "tokens_per_s": {s: {"median": median[s], "min": min(v), "max": max(v), "rounds": v} for s, v in rates.items()},
        "ratio": {"cache/recompute": median["nxdt_cache"] / median["nxdt_recompute"],
                  "cache/hf_generate": median["nxdt_cache"] / median["hf_generate"]},
    }


def report(result: dict[str, Any]) -> str:
    """Human-readable table of a ``run`` result."""
    cfg, tps = result["config"], result["tokens_per_s"]
    lines = [f"machine: {result['machine']}",
             f"config: preset={cfg['preset']} batch={cfg['batch']} prompt={cfg['prompt_len']} new={cfg['new_tokens']} "
             f"rounds={cfg['rounds']} threads={cfg['threads']}",
             f"same tokens as nxdt_cache: {result['same_tokens_as_nxdt_cache']}", "",
             f"{'side':<15} {'median tok/s':>13} {'min':>9} {'max':>9}"]
    for side in SIDES:
        lines.append(f"{side:<15} {tps[side]['median']:>13.1f} {tps[side]['min']:>9.1f} {tps[side]['max']:>9.1f}")
    lines.append("")
    lines += [f"{k}: {v:.2f}x" for k, v in result["ratio"].items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    args = parse_args(argv)
    result = run(args)
    print(json.dumps(result, indent=2) if args.json else report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
