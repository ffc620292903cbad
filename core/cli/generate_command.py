"""`nxdt generate SOURCE --prompt TEXT`: decode from a checkpoint, an HF directory or a preset, with a KV cache.

The prompt is encoded as the SFT recipe encodes its inputs (BOS, then the text without added
special tokens), or with ``--chat`` through the tokenizer's chat template with the generation
prompt; decoding stops at EOS (the tokenizer's, and any in an HF directory's generation_config.json).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from nxdt.errors import ConfigError, NxdtError


@dataclass
class Loaded:
    """A model ready to decode, its tokenizer and what stops it."""

    model: torch.nn.Module
    tokenizer: Any
    family: str
    source: str
    eos_ids: list[int] = field(default_factory=list)
    max_positions: int | None = None


def add_parser(sub: argparse._SubParsersAction, add_common: Callable[[argparse.ArgumentParser], None]) -> None:
    """Register `nxdt generate`."""
    p = sub.add_parser("generate", help="decode from a checkpoint, an HF directory or a preset (KV cache)")
    p.add_argument("source", help="an nxdt checkpoint (or run directory: its latest), an HF directory, or a preset")
    p.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for a batch)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="new tokens at most (default 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy; > 0: sample")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="sample from the smallest set with this much mass")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole sequence for every token")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    add_common(p)


def check_options(args: argparse.Namespace) -> None:
    """Refuse sampling options that mean nothing (one line, exit 2)."""
    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.temperature < 0:
        raise ConfigError(f"--temperature must be >= 0, got {args.temperature}")
    if args.top_k is not None and args.top_k < 1:
        raise ConfigError(f"--top-k must be at least 1, got {args.top_k}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise ConfigError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.temperature == 0 and (args.top_k is not None or args.top_p is not None):
        raise ConfigError("--top-k/--top-p select among sampled tokens; set --temperature above 0 to sample")


def cmd_generate(args: argparse.Namespace) -> int:
    """Decode each prompt and print its continuation (``--json``: ids, text, timing)."""
    from nxdt.generation import Sampling, generate

    check_options(args)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    loaded = load_source(args.source, device)
    tok = loaded.tokenizer
    prompts = [encode_prompt(tok, p, args.chat) for p in args.prompt]
    sampling = Sampling(args.temperature, args.top_k, args.top_p, args.seed)
    t0 = time.perf_counter()
    try:
        rows = generate(loaded.model, prompts, args.max_new_tokens, loaded.eos_ids, tok.pad_id, sampling=sampling,
                        use_cache=False if args.no_cache else None, device=device, max_length=loaded.max_positions)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    elapsed = time.perf_counter() - t0
    new_tokens = sum(len(r) for r in rows)
    results = [
        {"prompt": text, "prompt_ids": ids, "tokens": row, "text": tok.decode(row, skip_special_tokens=True),
         "stopped_at_eos": bool(row) and row[-1] in loaded.eos_ids}
        for text, ids, row in zip(args.prompt, prompts, rows)
    ]
    if args.json:
        print(json.dumps({"source": loaded.source, "family": loaded.family, "device": str(device),
                          "kv_cache": not args.no_cache, "seconds": elapsed,
                          "tokens_per_s": new_tokens / elapsed if elapsed else None, "results": results}, indent=2))
        return 0
    for r in results:
        print(r["text"])
    print(f"nxdt: {new_tokens} tokens in {elapsed:.2f} s ({new_tokens / max(elapsed, 1e-9):,.0f} tokens/s, "
          f"{'recomputed' if args.no_cache else 'KV cache'}, {device.type})", file=sys.stderr)
    return 0


def encode_prompt(tokenizer: Any, text: str, chat: bool) -> list[int]:
    """Token ids decoding starts from: BOS + text as SFT training saw it, or the chat template's rendering."""
    from nxdt.data.sft import prompt_ids

    if chat:
        return tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
    return prompt_ids(tokenizer, text)


def load_source(source: str, device: torch.device) -> Loaded:
    """A checkpoint (or a run directory's latest), an HF directory (config.json) or a preset, in eval mode."""
    path = Path(source).expanduser()
    if "://" in source or (path.is_dir() and not (path / "config.json").is_file()):
        return _from_checkpoint(source, device)
    if path.is_dir():
        return _from_hf_dir(path, device)
    return _from_preset(source, device)


def _causal(spec: Any, source: str) -> None:
    if spec.task != "causal_lm":
        raise NxdtError(f"{source}: nxdt generate decodes causal language models; the {spec.family} family's "
                        f"task is {spec.task}")


def _eval_model(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    return model.to(device).eval()


def _from_checkpoint(source: str, device: torch.device) -> Loaded:
    from nxdt.checkpoint.hf_export import merged_weights, read_checkpoint
    from nxdt.checkpoint.layout import inspect_marker
    from nxdt.checkpoint.store import Store, split_checkpoint_url

    checkpoint = source
    store, name = split_checkpoint_url(source)
    marker, _ = inspect_marker(store, name)
    if marker is None:  # a run directory or checkpoint root: its latest complete checkpoint
        from nxdt.checkpoint.layout import latest_complete
        from nxdt.cli.checkpoint_commands import _root_of

        root = _root_of(source)
        if "://" not in root and not os.path.isdir(root):
            raise NxdtError(f"{source}: not a checkpoint, run directory or HF directory")
        latest = latest_complete(Store(root))
        if latest is None:
            raise NxdtError(f"{source}: no complete checkpoint there (see `nxdt checkpoints {source}`)")
        checkpoint = Store(root).url(latest.name)
    run, state, _ = read_checkpoint(checkpoint)
    _causal(run.spec, source)
    state = merged_weights(run, state)
    with torch.device("meta"):
        model = run.spec.build_model(run.arch)
    model.to_empty(device="cpu")
    with torch.no_grad():
        run.spec.init_weights(model, run.arch)  # buffers (RoPE tables) the checkpoint does not hold
    missing, unexpected = model.load_state_dict(state, strict=False)
    buffers = dict(model.named_buffers())
    missing = [k for k in missing if k not in buffers]
    if missing or unexpected:
        raise NxdtError(f"{checkpoint}: the checkpoint does not match its model (missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]})")
    tokenizer = run_tokenizer(run.config)
    return Loaded(_eval_model(model, device), tokenizer, run.family, checkpoint, [tokenizer.eos_id],
                  getattr(run.arch, "max_position_embeddings", None))


def _from_hf_dir(path: Path, device: torch.device) -> Loaded:
    from nxdt.data.tokenizer import load_tokenizer
    from nxdt.pretrained import from_pretrained, read_hf_config, spec_for_model_type

    config = read_hf_config(path)
    spec = spec_for_model_type(config.get("model_type", ""))
    _causal(spec, str(path))
    model = from_pretrained(path)
    tokenizer = load_tokenizer(path)
    eos = {tokenizer.eos_id}
    gen_file = path / "generation_config.json"
    for extra in (config.get("eos_token_id"), _read_json(gen_file).get("eos_token_id")):
        eos.update(extra if isinstance(extra, list) else [extra] if isinstance(extra, int) else [])
    return Loaded(_eval_model(model, device), tokenizer, spec.family, str(path), sorted(eos),
                  config.get("max_position_embeddings"))


def _from_preset(name: str, device: torch.device) -> Loaded:
    from nxdt.resolve import resolve

    run = resolve(name)
    _causal(run.spec, name)
    with torch.device("meta"):
        model = run.spec.build_model(run.arch)
    model.to_empty(device="cpu")
    torch.manual_seed(run.config.seed)
    with torch.no_grad():
        run.spec.init_weights(model, run.arch)
    tokenizer = run_tokenizer(run.config)
    return Loaded(_eval_model(model, device), tokenizer, run.family, f"{name} (initialised, untrained)",
                  [tokenizer.eos_id], getattr(run.arch, "max_position_embeddings", None))


def run_tokenizer(cfg: Any) -> Any:
    """The tokenizer a run trains with (``data.tokenizer``, the HF checkpoint's, or the embedded one)."""
    from nxdt.data.tokenizer import load_tokenizer
    from nxdt.recipes.data import tokenizer_source

    tok_cfg = cfg.data.tokenizer
    extra = {k: getattr(tok_cfg, k, None) for k in ("vocab_file", "merge_file")}
    return load_tokenizer(tokenizer_source(cfg), **{k: v for k, v in extra.items() if v})


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
