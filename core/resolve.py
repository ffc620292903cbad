"""Turns `preset | config.yaml` + recipe + overrides into one validated RunConfig and a model config.

Layers, later winning: the preset (architecture, sequence length, default distributed strategy),
the recipe's defaults, the preset's own defaults, the YAML file, then command-line overrides.
A YAML file names its architecture through ``model.model_config`` (an HF config.json) and/or the
NxDT ``model.*`` keys; its family comes from config.json's ``model_type``, else from ``name``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nxdt.config import RunConfig, compose, load_yaml
from nxdt.errors import ConfigError, NxdtError
from nxdt.plugin_host import PluginHost, get_host
from nxdt.specs import ModelSpec, ParallelDims, PresetSpec, RecipeSpec


@dataclass
class ResolvedRun:
    """Everything a run needs to start: the config, the family's spec and its architecture config."""

    config: RunConfig
    family: str
    spec: ModelSpec
    arch: Any
    preset: PresetSpec | None
    recipe: RecipeSpec | None
    source: str

    def parallel_dims(self, world_size: int | None = None) -> ParallelDims:
        """The parallel layout of this run for ``world_size`` ranks (DP fills what is left)."""
        return parallel_dims(self.config, world_size)


def is_config_file(target: str) -> bool:
    """Whether ``target`` names a YAML file rather than a preset."""
    return target.endswith((".yaml", ".yml")) or Path(target).is_file()


def preset_layer(preset: PresetSpec) -> dict[str, Any]:
    """The config layer a preset contributes."""
    model = dict(preset.architecture)
    model.setdefault("encoder_seq_length", preset.seq_length)
    return {
        "name": preset.name,
        "model_source": preset.style,
        "model": model,
        "data": {"seq_length": preset.seq_length},
        "distributed_strategy": dict(preset.distributed_strategy),
    }


def resolve(
    target: str,
    recipe: str | None = None,
    overrides: Sequence[str] = (),
    host: PluginHost | None = None,
) -> ResolvedRun:
    """Resolve a preset name or YAML path, a recipe and overrides into a ``ResolvedRun``."""
    host = host or get_host()
    recipe_spec = host.recipe(recipe) if recipe else None
    layers: list[dict[str, Any]] = []
    preset: PresetSpec | None = None
    if is_config_file(target):
        file_layer = load_yaml(target)
        if recipe_spec:
            layers.append(dict(recipe_spec.defaults))
        layers.append(file_layer)
    else:
        preset = host.preset(target)
        layers.append(preset_layer(preset))
        if recipe_spec:
            layers.append(dict(recipe_spec.defaults))
        if preset.defaults:
            layers.append(dict(preset.defaults))
    config = compose(layers, overrides)
    hf_path = hf_config_path(config)
    if preset and hf_path and Path(hf_path).is_file():
        # An HF checkpoint's config.json defines the architecture; the preset keeps only its
        # training defaults, and model.* keys the user sets still apply on top.
        layers[0] = {k: v for k, v in layers[0].items() if k != "model"}
        config = compose(layers, overrides)
    family = preset.family if preset else _family_of_file(config, host)
    spec = host.model_spec(family)
    if recipe_spec and not recipe_spec.supports(family):
        raise NxdtError(
            f"recipe {recipe_spec.name!r} does not support the {family!r} family "
            f"(it supports {', '.join(recipe_spec.families)}); recipes for {family}: {', '.join(host.recipes_for(family))}"
        )
    arch = architecture_config(spec, config)
    return ResolvedRun(config, family, spec, arch, preset, recipe_spec, target)


def architecture_config(spec: ModelSpec, config: RunConfig) -> Any:
    """The family's architecture config: HF config.json if given, then the NxDT ``model.*`` keys over it."""
    base = None
    hf_path = hf_config_path(config)
    if hf_path and Path(hf_path).is_file():
        base = spec.config_from_hf(json.loads(Path(hf_path).read_text()))
    try:
        return spec.config_from_nxdt(config.model.architecture_overrides(), base=base)
    except (TypeError, ValueError, KeyError) as exc:
        raise ConfigError(f"model: {exc}") from None


def hf_config_path(config: RunConfig) -> str | None:
    """The HF config.json that defines the architecture: ``model.model_config``, else the one in ``model.hf_checkpoint``."""
    if config.model.model_config_path:
        return config.model.model_config_path
    if config.model.hf_checkpoint:
        return str(Path(config.model.hf_checkpoint) / "config.json")
    return None


def _family_of_file(config: RunConfig, host: PluginHost) -> str:
    hf_path = hf_config_path(config)
    if hf_path and Path(hf_path).is_file():
        model_type = json.loads(Path(hf_path).read_text()).get("model_type", "")
        for spec in host.models:
            if model_type in spec.hf_model_types:
                return spec.family
        raise NxdtError(f"{hf_path}: no installed plugin handles model_type {model_type!r}")
    # NxDT configs name the family in `name` (hf_llama, megatron_gpt, hf_mixtral).
    name = (config.name or "").lower()
    for family in sorted((s.family for s in host.models), key=len, reverse=True):
        if family in name:
            return family
    for preset in host.presets:
        if preset.family in name:
            return preset.family
    raise NxdtError(
        f"cannot tell the model family of {config.name!r}: set model.model_config to an HF config.json "
        f"or name the run after its family (e.g. name: hf_llama)"
    )


def parallel_dims(config: RunConfig, world_size: int | None = None) -> ParallelDims:
    """ParallelDims from ``distributed_strategy``; DP is whatever the world size leaves."""
    ds = config.distributed_strategy
    tp = ds.tensor_model_parallel_size or 1
    pp = ds.pipeline_model_parallel_size or 1
    cp = ds.context_parallel_size or 1
    ep = ds.expert_model_parallel_size or 1
    vpp = ds.virtual_pipeline_model_parallel_size or 1
    model_parallel = tp * pp * cp
    if world_size is None:
        world_size = (config.trainer.devices or 1) * (config.trainer.num_nodes or 1)
        if world_size % model_parallel:
            world_size = model_parallel
    if world_size % model_parallel:
        raise ConfigError(
            f"world size {world_size} is not divisible by tensor({tp}) x pipeline({pp}) x context({cp}) = {model_parallel}"
        )
    dp = world_size // model_parallel
    if dp % ep:
        raise ConfigError(f"expert_model_parallel_size {ep} must divide the data-parallel size {dp} (world {world_size} / {model_parallel})")
    return ParallelDims(
        dp=dp,
        tp=tp,
        pp=pp,
        ep=ep,
        cp=cp,
        vpp=vpp,
        sequence_parallel=bool(ds.sequence_parallel) and tp > 1,
        kv_replicator=ds.kv_replicator or 1,
    )


def gradient_accumulation(config: RunConfig, dp: int) -> int:
    """Micro-batches per optimizer step: ``global_batch_size / (micro_batch_size x dp)``, which must divide."""
    mbs, gbs = config.data.micro_batch_size, config.data.global_batch_size
    if gbs % (mbs * dp):
        raise ConfigError(
            f"data.global_batch_size ({gbs}) must be divisible by micro_batch_size ({mbs}) x "
            f"data-parallel size ({dp}) = {mbs * dp}"
        )
    return gbs // (mbs * dp)
