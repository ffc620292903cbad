"""The curated preset catalogue, hub_registry.toml, read into ``PresetSpec`` objects."""

from __future__ import annotations

import os
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any

from nxdt.errors import NxdtError
from nxdt.specs import PresetSpec

_REQUIRED = ("family", "plugin", "style", "hf_model_id", "architecture")


def hub_registry_path() -> Path:
    """Where the catalogue is read from: ``$NXDT_HUB_REGISTRY`` or the copy shipped with nxdt."""
    env = os.environ.get("NXDT_HUB_REGISTRY")
    if env:
        return Path(env)
    return Path(str(resources.files("nxdt") / "hub_registry.toml"))


def load_hub_presets(path: Path | None = None) -> list[PresetSpec]:
    """Parse the catalogue; a malformed entry is an error naming the preset and the missing key."""
    path = path or hub_registry_path()
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise NxdtError(f"hub registry not found: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise NxdtError(f"{path}: {exc}") from None
    presets = []
    for name, entry in data.get("presets", {}).items():
        missing = [k for k in _REQUIRED if k not in entry]
        if missing:
            raise NxdtError(f"{path}: preset {name!r} lacks {', '.join(missing)}")
        presets.append(_preset(name, entry, f"{path.name}"))
    return presets


def _preset(name: str, entry: dict[str, Any], source: str) -> PresetSpec:
    if entry["style"] not in ("hf", "megatron"):
        raise NxdtError(f"{source}: preset {name!r} style must be 'hf' or 'megatron', not {entry['style']!r}")
    return PresetSpec(
        name=name,
        family=entry["family"],
        plugin=entry["plugin"],
        style=entry["style"],
        hf_model_id=entry["hf_model_id"],
        architecture=dict(entry["architecture"]),
        distributed_strategy=dict(entry.get("distributed_strategy", {})),
        reference_machine=entry.get("reference_machine", ""),
        seq_length=int(entry.get("seq_length", 2048)),
        defaults=dict(entry.get("defaults", {})),
        description=entry.get("description", ""),
        source=source,
        recipe_defaults={k: dict(v) for k, v in entry.get("recipe_defaults", {}).items()},
    )
