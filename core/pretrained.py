"""Hugging Face checkpoints in and out: ``nxdt.from_pretrained`` and weight loading by family adapter."""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nxdt.errors import NxdtError
from nxdt.specs import ModelSpec


def read_hf_config(path: str | Path) -> dict[str, Any]:
    """The config.json of an HF checkpoint directory."""
    cfg_path = Path(path) / "config.json"
    if not cfg_path.is_file():
        raise NxdtError(f"not a transformers checkpoint directory (no config.json): {path}")
    return json.loads(cfg_path.read_text())


def spec_for_model_type(model_type: str) -> ModelSpec:
    """The installed family whose ``hf_model_types`` include ``model_type``."""
    from nxdt.plugin_host import get_host

    host = get_host()
    for spec in host.models:
        if model_type in spec.hf_model_types:
            return spec
    known = sorted(t for s in host.models for t in s.hf_model_types)
    raise NxdtError(f"no installed plugin handles model_type {model_type!r} (installed: {', '.join(known) or 'none'})")


def safetensors_files(path: str | Path) -> list[Path]:
    """The safetensors shards of an HF checkpoint (index file honoured), in order."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [path / n for n in names]
    else:
        files = sorted(path.glob("*.safetensors"))
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise NxdtError(f"missing checkpoint file: {missing[0]}")
    if not files:
        raise NxdtError(f"no .safetensors files in {path}")
    return files


def read_hf_state_dict(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """All tensors of an HF safetensors checkpoint."""
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for f in safetensors_files(path):
        state.update(load_file(str(f), device=str(device)))
    return state


def load_hf_weights(model: nn.Module, spec: ModelSpec, arch: Any, path: str | Path) -> None:
    """Copy an HF checkpoint's weights into a materialized single-device model through the adapter."""
    adapter = spec.state_dict_adapter(arch)
    hf_state = read_hf_state_dict(path, device=next(model.parameters()).device)
    state = adapter.from_hf(hf_state)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not _is_buffer(model, k)]
    if missing or unexpected:
        raise NxdtError(
            f"{path}: checkpoint does not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )


def _is_buffer(model: nn.Module, key: str) -> bool:
    return key in dict(model.named_buffers())


def from_pretrained(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> nn.Module:
    """Read a transformers checkpoint directory, pick the family from ``model_type``, return the nxdt model.

    The model is the family's own module (its state-dict names are nxdt's) in eval mode. It takes
    HF's keyword inputs (``model(**tokenizer(text, return_tensors="pt"))``: ``input_ids``,
    ``attention_mask``, ``token_type_ids``, ``position_ids``) and returns the logits tensor, or
    outputs whose ``.logits`` are the logits (a family with several heads, such as BERT's NSP).
    """
    hf_config = read_hf_config(path)
    spec = spec_for_model_type(hf_config.get("model_type", ""))
    arch = spec.config_from_hf(hf_config)
    with torch.device("meta"):
        model = spec.build_model(arch)
    model.to_empty(device=device)
    with torch.no_grad():
        spec.init_weights(model, arch)  # fills buffers (RoPE tables) the checkpoint does not hold
    load_hf_weights(model, spec, arch, path)
    if dtype is not None:
        model.to(dtype)
    model.eval()
    model.register_forward_pre_hook(_hf_inputs(model, spec), with_kwargs=True)
    return model


#: HF inputs that say nothing when they hold these values: one segment, no padding
_NEUTRAL = {"token_type_ids": lambda v: not bool(v.any()), "attention_mask": lambda v: bool(v.all())}


def _hf_inputs(model: nn.Module, spec: ModelSpec) -> Any:
    """A forward pre-hook passing on the keyword inputs ``model.forward`` takes.

    HF tokenizers return what the *tokenizer* knows (``token_type_ids`` from a BERT tokenizer,
    ``attention_mask`` always): an input the family's forward does not take is dropped where it
    holds no information (all zeros token types, an all-ones mask) and refused otherwise.
    """
    takes = set(inspect.signature(model.forward).parameters)

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        for name, value in kwargs.items():
            if name in takes or value is None:
                continue
            neutral = _NEUTRAL.get(name)
            if neutral is None or not isinstance(value, torch.Tensor) or not neutral(value):
                raise NxdtError(
                    f"the {spec.family} model does not take {name}; its inputs are {', '.join(sorted(takes))}"
                )
        return args, {k: v for k, v in kwargs.items() if k in takes}

    return hook
