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
    tokenizer = _run_tokenizer(run.config)
    special = special_token_ids(tokenizer) if tokenizer is not None else {}
    (out / "config.json").write_text(json.dumps({**hf_config, **special}, indent=2))
    if special:
        # transformers' generate reads its stopping and padding ids from here.
        (out / "generation_config.json").write_text(json.dumps({**special, "do_sample": False}, indent=2))
    tokenizer_files = write_tokenizer(run.config, tokenizer, out, getattr(run.arch, "max_position_embeddings", None))
    return {"checkpoint": checkpoint, "out_dir": str(out), "step": marker["step"], "family": run.family,
            "tensors": len(hf_state), "shards": len(shards), "tokenizer_files": tokenizer_files}


def _run_tokenizer(cfg: Any) -> Any:
    """The run's tokenizer, or None when it cannot be loaded here (a hub id not in the local cache)."""
    from nxdt.cli.generate_command import run_tokenizer

    try:
        return run_tokenizer(cfg)
    except NxdtError:
        return None


def special_token_ids(tokenizer: Any) -> dict[str, int]:
    """``bos_token_id``/``eos_token_id``/``pad_token_id`` as nxdt uses them (no BOS key when it has none)."""
    ids = {"eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id}
    return {"bos_token_id": tokenizer.bos_id, **ids} if tokenizer.bos_id is not None else ids


def write_tokenizer(cfg: Any, tokenizer: Any, out: Path, max_length: int | None = None) -> list[str]:
    """Tokenizer files that transformers loads into nxdt's tokenizer: same vocabulary, BOS added as nxdt adds it.

    A fast (``tokenizers``) tokenizer is written from the loaded tokenizer itself, with nxdt's
    special tokens, a post-processor that prepends BOS (SFT prompts start with it) and a
    tokenizer_config.json naming every special token, so that no family's tokenizer class adds
    one of its own defaults (Qwen2's ``<|endoftext|>``). Other tokenizers are copied as they are.
    """
    rust = _rust_backend(tokenizer) if tokenizer is not None else None
    if rust is None:
        return _copy_tokenizer(cfg, out)
    data = json.loads(rust.to_str())
    bos = tokenizer.bos_id
    if bos is not None:
        data["post_processor"] = _bos_processor(rust.id_to_token(bos), bos, data.get("post_processor"))
    else:
        data["post_processor"] = None
    (out / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    names = {"bos_token": bos, "eos_token": tokenizer.eos_id, "pad_token": tokenizer.pad_id}
    special = {key: rust.id_to_token(i) for key, i in names.items() if i is not None}
    unk = (data.get("model") or {}).get("unk_token")
    special["unk_token"] = unk if unk is not None and rust.token_to_id(unk) is not None else None
    config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", **special,
                              "clean_up_tokenization_spaces": False}
    if max_length:
        config["model_max_length"] = max_length
    template = _chat_template(tokenizer)
    if template:
        config["chat_template"] = template
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")
    mapping = {k: v for k, v in special.items() if v is not None}
    (out / "special_tokens_map.json").write_text(json.dumps(mapping, indent=2, ensure_ascii=False), encoding="utf-8")
    for stale in ("vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "tokenizer.model"):
        (out / stale).unlink(missing_ok=True)  # tokenizer.json above is the whole tokenizer
    return ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]


def _rust_backend(tokenizer: Any) -> Any:
    """The ``tokenizers.Tokenizer`` behind an nxdt tokenizer, or None (sentencepiece, slow HF tokenizers)."""
    rust = getattr(tokenizer, "rust", None)
    if rust is None:
        rust = getattr(getattr(tokenizer, "hf", None), "backend_tokenizer", None)
    return rust if hasattr(rust, "to_str") else None


def _chat_template(tokenizer: Any) -> str | None:
    template = getattr(tokenizer, "chat_template", None) or getattr(getattr(tokenizer, "hf", None), "chat_template", None)
    return template if isinstance(template, str) else None


def _bos_processor(bos: str, bos_id: int, existing: Any) -> dict[str, Any]:
    """A post-processor prepending ``bos`` (after a byte-level one, which only trims offsets)."""
    template = {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                 {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}},
    }
    if isinstance(existing, dict) and existing.get("type") == "ByteLevel":
        return {"type": "Sequence", "processors": [existing, template]}
    return template


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
