"""Sharded materialization: every rank allocates and fills only its own shards.

The model is built on the meta device and split for PP, TP and EP there; only then does each rank
allocate its parameters (``to_empty``) and fill them. Values do not depend on the layout: every
parameter's *single-device* value is generated from a generator seeded by the run seed and the
parameter's canonical name (the family's ``init_parameter`` rule, or LoRA's for adapters), and this
rank keeps its slice through the same mapping checkpoints use (``nxdt.checkpoint.portable``: TP
slices, KV-head replication, one tensor per expert). The full value of one parameter is the most
that exists at once. HF weights (``model.hf_checkpoint``) are read one layer group at a time,
converted by the family's adapter and sliced the same way, so a rank's peak is its share plus one
layer, never the checkpoint.

Families without ``init_parameter`` (plugin API 1, or families that do not declare one) are
materialized whole before sharding, as before; the trainer says so at start-up.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from nxdt.errors import NxdtError
from nxdt.parallel.grad_norm import local_tensor
from nxdt.parallel.param_record import WRAPPER_PREFIX, clean_name


def key_generator(seed: int, key: str) -> torch.Generator:
    """A CPU generator seeded by the run seed and a parameter's canonical name (stable across layouts and runs)."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") % (2**63))


def lora_init(name: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """PEFT's LoRA init: ``lora_A`` Kaiming-uniform, ``lora_B`` zero (training starts from the base model)."""
    if name == "lora_B":
        return torch.zeros(shape)
    bound = 1.0 / math.sqrt(shape[1])  # kaiming_uniform_ with a=sqrt(5): gain sqrt(1/3) * sqrt(3 / fan_in)
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


def _modules_by_clean_name(model: nn.Module) -> dict[str, nn.Module]:
    return {name.replace(WRAPPER_PREFIX, ""): m for name, m in model.named_modules()}


#: Elements of one row block of a drawn parameter (values are defined block by block, see draw_local).
BLOCK_ELEMENTS = 1 << 22


def draw_local(draw: Callable[[tuple[int, ...], torch.Generator], torch.Tensor], seed: int, key: str,
               empty: torch.Tensor) -> torch.Tensor:
    """This rank's part of a parameter whose single-device value is drawn block of rows by block of rows.

    Row block ``k`` of parameter ``key`` comes from its own generator, so a rank draws only the
    blocks that meet its rows (a row-sharded weight) and keeps its columns of each (a
    column-sharded one): never the whole tensor, and the same values under any layout.
    """
    shape = tuple(empty.shape)
    if not shape:
        return _slice_like(draw(shape, key_generator(seed, key)), empty)
    rows_per_block = max(1, BLOCK_ELEMENTS // max(1, math.prod(shape[1:])))
    if isinstance(empty, DTensor):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        local_shape, offset = compute_local_shape_and_global_offset(empty.shape, empty.device_mesh, empty.placements)
    else:
        local_shape, offset = shape, (0,) * len(shape)
    r0, r1 = offset[0], offset[0] + local_shape[0]
    parts = []
    for k in range(r0 // rows_per_block, -(-r1 // rows_per_block)):
        b0, b1 = k * rows_per_block, min((k + 1) * rows_per_block, shape[0])
        block = draw((b1 - b0, *shape[1:]), key_generator(seed, f"{key}#{k}"))
        block = block[max(r0, b0) - b0 : min(r1, b1) - b0]
        for dim in range(1, len(shape)):
            block = block.narrow(dim, offset[dim], local_shape[dim])
        parts.append(block)
    local = torch.cat(parts) if len(parts) > 1 else parts[0]
    if not isinstance(empty, DTensor):
        return local
    return DTensor.from_local(local.contiguous(), empty.device_mesh, empty.placements, run_check=False,
                              shape=empty.shape, stride=empty.stride())


def _slice_like(full: torch.Tensor, empty: torch.Tensor) -> torch.Tensor:
    """``full`` (a single-device value) as ``empty`` holds it: a DTensor of this rank's slice, or itself."""
    if not isinstance(empty, DTensor):
        return full
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(empty.shape, empty.device_mesh, empty.placements)
    local = full
    for dim, (size, start) in enumerate(zip(shape, offset)):
        local = local.narrow(dim, start, size)
    return DTensor.from_local(local.contiguous(), empty.device_mesh, empty.placements, run_check=False,
                              shape=empty.shape, stride=empty.stride())


def _fill(model: Any, portable: Any, values_for: Callable[[str, str, nn.Parameter, dict[str, torch.Tensor]], dict | None],
          presliced: bool = False) -> set[str]:
    """For each parameter: its saved-form values from ``values_for`` -> this rank's local tensor. Returns filled names.

    ``presliced``: ``values_for`` already returns each value as this rank holds it (DTensors of its slices).
    """
    filled = set()
    with torch.no_grad():
        for name, p in portable.params:
            empties = portable.targets(name, p, torch.float32)
            values = values_for(name, portable.key[name], p, empties)
            if values is None:
                continue
            if not presliced:
                values = {k: _slice_like(v, empties[k]) for k, v in values.items()}
            local = portable.gathered(name, p, values)
            if local is None:
                continue
            local_tensor(p).copy_(local.to(local_tensor(p).dtype))
            filled.add(name)
    return filled


def init_sharded(model: Any, spec: Any, arch: Any, seed: int) -> None:
    """Fill every parameter of the (sharded, materialized) ParallelModel-to-be from per-name generators."""
    from nxdt.checkpoint.portable import PortableState

    modules = _modules_by_clean_name(model.trainable_module)
    roles = {r.local_name: r.role for r in model.records}
    portable = PortableState(model)

    def values_for(name: str, key: str, p: nn.Parameter, empties: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        module_name, _, pname = name.rpartition(".")
        module = modules[module_name]
        adapter = roles.get(name) == "adapter"

        def draw(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
            if adapter:
                return lora_init(pname, shape, generator)
            return spec.init_parameter(module, pname, shape, arch, generator)

        return {saved_key: draw_local(draw, seed, saved_key, empty) for saved_key, empty in empties.items()}

    _fill(model, portable, values_for, presliced=True)
    for module in model.trainable_module.modules():
        # Buffers (RoPE tables) are computed, not drawn: every rank fills its own.
        if any(True for _ in module.buffers(recurse=False)) and hasattr(module, "reset_parameters"):
            if not any(True for _ in module.parameters(recurse=False)):
                module.reset_parameters()


_LAYER = re.compile(r"\.(\d+)\.")


def _hf_layer_groups(path: Path) -> dict[str, list[tuple[Path, list[str]]]]:
    """Layer index (or "top") -> the (file, keys) holding it, for an HF safetensors checkpoint."""
    from safetensors import safe_open

    from nxdt.pretrained import safetensors_files

    layers: dict[str, list[tuple[Path, list[str]]]] = {}
    for f in safetensors_files(path):
        per_layer: dict[str, list[str]] = {}
        with safe_open(str(f), framework="pt") as handle:
            for key in handle.keys():
                m = _LAYER.search(key)
                per_layer.setdefault(m.group(1) if m else "top", []).append(key)
        for layer, keys in per_layer.items():
            if layer == "top":  # embeddings, final norm, LM head: never fused, so one tensor at a time
                for key in keys:
                    layers.setdefault(f"top:{key}", []).append((f, [key]))
            else:
                layers.setdefault(layer, []).append((f, keys))
    return layers


def load_hf_sharded(model: Any, spec: Any, arch: Any, path: str | Path) -> None:
    """Copy an HF checkpoint into the sharded model one layer at a time (each rank keeps its slices)."""
    from safetensors import safe_open

    from nxdt.checkpoint.portable import PortableState

    portable = PortableState(model)
    adapter = spec.state_dict_adapter(arch)
    adapters = {r.local_name for r in model.records if r.role == "adapter"}
    wanted = {name for name, _ in portable.params if name not in adapters}
    filled: set[str] = set()
    for parts in _hf_layer_groups(Path(path)).values():
        hf_state: dict[str, torch.Tensor] = {}
        for f, keys in parts:
            with safe_open(str(f), framework="pt") as handle:
                hf_state.update({k: handle.get_tensor(k) for k in keys})
        try:
            ours = adapter.from_hf(hf_state)
        except (KeyError, ValueError) as exc:
            raise NxdtError(f"{path}: checkpoint does not match the model ({exc})") from None
        del hf_state

        def values_for(name: str, key: str, p: nn.Parameter, empties: dict[str, torch.Tensor],
                       _ours: dict[str, torch.Tensor] = ours) -> dict[str, torch.Tensor] | None:
            if key not in _ours:
                return None
            # In the checkpoint's dtype: _fill slices first and casts only this rank's part.
            if len(empties) == 1 and key in empties:
                return {key: _ours[key]}
            # experts: stacked [E, ...] in the adapter's output, one saved key per expert (``<module>.<e>.<w>``)
            stacked = _ours[key]
            return {k: stacked[int(k.split(".")[-2])] for k in empties}

        filled |= _fill(model, portable, values_for)
    missing = sorted(wanted - filled)
    if missing:
        raise NxdtError(f"{path}: checkpoint does not match the model (missing {[portable.key[n] for n in missing][:3]})")


def describe_source(hf_dir: str | None) -> str:
    """Where the weights come from, for logs: the HF checkpoint's config name, else the seeded init."""
    if not hf_dir:
        return "seeded initialisation"
    cfg = Path(hf_dir) / "config.json"
    kind = json.loads(cfg.read_text()).get("model_type", "?") if cfg.is_file() else "?"
    return f"{hf_dir} ({kind})"


__all__ = ["clean_name", "describe_source", "init_sharded", "key_generator", "load_hf_sharded", "lora_init"]
