"""A checkpoint of any parallel layout as a transformers directory: config.json + sharded safetensors."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from nxdt.checkpoint.dcp_io import load_model_tensors
from nxdt.checkpoint.layout import CONFIG_FILE, inspect_marker, verify_files
from nxdt.checkpoint.store import split_checkpoint_url
from nxdt.errors import NxdtError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "vocab.txt", "merges.txt", "added_tokens.json", "chat_template.jinja")


def resolve_checkpoint_config(config_text: str) -> Any:
    """The ResolvedRun of a checkpoint's saved config (family, architecture, tokenizer)."""
    from nxdt.resolve import resolve

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.yaml"
        path.write_text(config_text)
        return resolve(str(path))


def shard_state_dict(state: dict[str, torch.Tensor], max_shard_bytes: int) -> list[dict[str, torch.Tensor]]:
    """Split ``state`` into shards of at most ``max_shard_bytes`` (a bigger tensor gets a shard alone)."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key in sorted(state):
        t = state[key]
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += nbytes
    return shards


def read_checkpoint(checkpoint: str) -> tuple[Any, dict[str, torch.Tensor], dict[str, Any]]:
    """(the ResolvedRun of its saved config, its full model tensors, its marker) of a complete checkpoint."""
    store, name = split_checkpoint_url(checkpoint)
    marker, problem = inspect_marker(store, name)
    if marker is None:
        raise NxdtError(f"{checkpoint} is not a complete nxdt checkpoint ({problem or 'no completion marker'})")
    problems = verify_files(store, name, marker)
    if problems:
        raise NxdtError(problems[0])
    config_text = store.read_text(name, CONFIG_FILE)
    if config_text is None:
        raise NxdtError(f"{checkpoint} has no {CONFIG_FILE}; cannot tell the model family")
    run = resolve_checkpoint_config(config_text)
    return run, load_model_tensors(store, name, marker), marker


def merged_weights(run: Any, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model's weights with any LoRA adapters merged in (the base from the run's start when not saved)."""
    from nxdt.peft.export import base_state_of, lora_settings_of, merge_adapters, split_lora_state

    base, adapters = split_lora_state(state)
    if not adapters:
        return state
    settings = lora_settings_of(run.config)
    if not all(f"{module}.weight" in base for module in adapters):
        base = {**base_state_of(run), **base}  # the checkpoint holds adapters only (save_lora_base=false)
    return merge_adapters(base, adapters, settings.scale)


def export_peft(checkpoint: str, out_dir: str | Path) -> dict[str, Any]:
    """Write a LoRA checkpoint's adapters as a PEFT directory (adapter_config.json + adapter_model.safetensors)."""
    from nxdt.peft.export import peft_adapter, write_peft

    run, state, marker = read_checkpoint(checkpoint)
    config, tensors = peft_adapter(run, state)
    out = write_peft(out_dir, config, tensors)
    tokenizer_files = _copy_tokenizer(run.config, out)
    return {"checkpoint": checkpoint, "out_dir": str(out), "step": marker["step"], "family": run.family,
            "tensors": len(tensors), "target_modules": config["target_modules"], "tokenizer_files": tokenizer_files}


def export_hf(checkpoint: str, out_dir: str | Path, max_shard_bytes: int = 2 << 30) -> dict[str, Any]:
    """Write ``checkpoint`` as an HF directory under ``out_dir`` (LoRA adapters merged); returns a summary."""
    from safetensors.torch import save_file

    run, state, marker = read_checkpoint(checkpoint)
    state = merged_weights(run, state)
    hf_state = run.spec.state_dict_adapter(run.arch).to_hf(state)
    # safetensors refuses tensors sharing storage (tied embeddings); each gets its own copy
    hf_state = {k: v.detach().clone().contiguous() for k, v in hf_state.items()}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shards = shard_state_dict(hf_state, max_shard_bytes)
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards, 1):
        fname = "model.safetensors" if len(shards) == 1 else f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, fname))
    if len(shards) > 1:
        total = sum(t.numel() * t.element_size() for t in hf_state.values())
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    dtype = next(iter(hf_state.values())).dtype
    hf_config = {**run.spec.config_to_hf(run.arch), "torch_dtype": str(dtype).removeprefix("torch.")}
    (out / "config.json").write_text(json.dumps(hf_config, indent=2))
    tokenizer_files = _copy_tokenizer(run.config, out)
    return {"checkpoint": checkpoint, "out_dir": str(out), "step": marker["step"], "family": run.family,
            "tensors": len(hf_state), "shards": len(shards), "tokenizer_files": tokenizer_files}


def _copy_tokenizer(cfg: Any, out: Path) -> list[str]:
    """Copy the run's tokenizer files when its tokenizer is a local directory (the embedded one included)."""
    from nxdt.data.embedded import embedded_paths
    from nxdt.recipes.data import tokenizer_source

    source = tokenizer_source(cfg)
    if source == "embedded":
        source = str(embedded_paths()["tokenizer"])
    if not Path(source).is_dir():
        return []
    copied = []
    for fname in TOKENIZER_FILES:
        if (Path(source) / fname).is_file():
            shutil.copy2(Path(source) / fname, out / fname)
            copied.append(fname)
    return copied
