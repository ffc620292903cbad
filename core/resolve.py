"""Turns `preset | config.yaml` + recipe + overrides into one validated RunConfig and a model config.

Layers, later winning: the preset (architecture, sequence length, default distributed strategy),
the recipe's defaults, the preset's own defaults, the YAML file, then command-line overrides.
A YAML file names its architecture through ``model.model_config`` (an HF config.json) and/or the
NxDT ``model.*`` keys; its family comes from config.json's ``model_type``, else from ``name``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nxdt.config import RunConfig, compose, load_yaml
from nxdt.config.support import architecture_notes, check_run
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
    #: keys that were accepted but have no effect on this backend (printed at start-up)
    notes: list[str] = field(default_factory=list)

    def parallel_dims(self, world_size: int | None = None) -> ParallelDims:
        """The parallel layout of this run for ``world_size`` ranks (DP fills what is left)."""
        return parallel_dims(self.config, world_size)


def is_config_file(target: str) -> bool:
    """Whether ``target`` names a YAML file rather than a preset."""
    return target.endswith((".yaml", ".yml")) or Path(target).is_file()


def preset_layer(preset: PresetSpec) -> dict[str, Any]:
    """The config layer a preset contributes."""
    return {
        "name": preset.name,
        "model_source": preset.style,
        "model": dict(preset.architecture),
        "data": {"seq_length": preset.seq_length},
        "distributed_strategy": dict(preset.distributed_strategy),
    }


def resolve(
    target: str,
    recipe: str | None = None,
    overrides: Sequence[str] = (),
    host: PluginHost | None = None,
) -> ResolvedRun:
    """Resolve a preset name or YAML path, a recipe and overrides into a ``ResolvedRun``.

    The recipe is the one called ``recipe`` that trains the family's task (two recipes may share
    a name across tasks); every key the run cannot honour is refused here, with one line.
    """
    host = host or get_host()
    layers: list[dict[str, Any]] = []
    preset: PresetSpec | None = None
    if is_config_file(target):
        file_layer = load_yaml(target)
        # The family decides which recipe a name means, so find it before layering recipe defaults.
        family = _family_of_file(compose([file_layer], overrides), host)
        spec = host.model_spec(family)
        recipe_spec = host.recipe(recipe, spec) if recipe else None
        if recipe_spec:
            layers.append(dict(recipe_spec.defaults))
        layers.append(file_layer)
    else:
        preset = host.preset(target)
        family = preset.family
        spec = host.model_spec(family, preset.plugin)
        recipe_spec = host.recipe(recipe, spec) if recipe else None
        layers.append(preset_layer(preset))
        if recipe_spec:
            layers.append(dict(recipe_spec.defaults))
        if preset.defaults:
            layers.append(dict(preset.defaults))
        if recipe_spec and recipe_spec.name in preset.recipe_defaults:
            layers.append(dict(preset.recipe_defaults[recipe_spec.name]))
    config = compose(layers, overrides)
    hf_path = hf_config_path(config)
    if preset and hf_path:
        # An HF checkpoint's config.json defines the architecture; the preset keeps only its
        # training defaults, and model.* keys the user sets still apply on top.
        layers[0] = {k: v for k, v in layers[0].items() if k != "model"}
        config = compose(layers, overrides)
    notes = check_run(config, spec, recipe_spec)
    arch = architecture_config(spec, config)
    notes += architecture_notes(config, arch)
    check_sequence_length(config, arch)
    return ResolvedRun(config, family, spec, arch, preset, recipe_spec, target, notes)


def default_recipe(target: str, host: PluginHost | None = None) -> str:
    """The recipe ``nxdt run TARGET`` uses without ``--recipe``.

    Presets: their family's default (``sft`` for causal LMs, ``pretrain`` for masked LMs). YAML
    files: ``sft``, ``dpo`` or ``orpo`` when they configure that ``model_alignment_strategy``
    section, else the family's pre-training.
    """
    host = host or get_host()
    if not is_config_file(target):
        preset = host.preset(target)
        return host.model_spec(preset.family, preset.plugin).recipe_default
    alignment = load_yaml(target).get("model_alignment_strategy") or {}
    return next((name for name in ("sft", "dpo", "orpo") if alignment.get(name) is not None), "pretrain")


def architecture_config(spec: ModelSpec, config: RunConfig) -> Any:
    """The family's architecture config: HF config.json if given, then the NxDT ``model.*`` keys over it."""
    base = None
    hf_path = hf_config_path(config)
    if hf_path:
        try:
            base = spec.config_from_hf(json.loads(Path(hf_path).read_text()))
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{hf_path}:{exc.lineno}: not valid JSON: {exc.msg}") from None
        except (TypeError, ValueError, KeyError) as exc:
            raise ConfigError(f"{hf_path}: {exc}") from None
    try:
        return spec.config_from_nxdt(config.model.architecture_overrides(), base=base)
    except (TypeError, ValueError, KeyError) as exc:
        message = str(exc).strip("'\"")
        raise ConfigError(message if message.startswith("model.") else f"model: {message}") from None


def check_sequence_length(config: RunConfig, arch: Any) -> None:
    """``data.seq_length`` must fit the model's positions and ``model.encoder_seq_length`` when set."""
    seq = config.data.seq_length
    max_pos = getattr(arch, "max_position_embeddings", None)
    if max_pos is not None and seq > max_pos:
        raise ConfigError(
            f"data.seq_length={seq} exceeds the model's max_position_embeddings ({max_pos}); "
            f"lower data.seq_length or raise model.max_position_embeddings"
        )
    encoder = config.model.encoder_seq_length
    if encoder is not None and seq > encoder:
        raise ConfigError(f"data.seq_length={seq} exceeds model.encoder_seq_length={encoder}, the model's sequence length")


def hf_config_path(config: RunConfig) -> str | None:
    """The HF config.json that defines the architecture: ``model.model_config``, else the one in ``model.hf_checkpoint``.

    A path that is set but does not exist is an error naming it (never silently the family defaults).
    """
    if config.model.model_config_path:
        path = Path(config.model.model_config_path).expanduser()
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ConfigError(f"model.model_config: {path} does not exist (an HF config.json is expected)")
        return str(path)
    if config.model.hf_checkpoint:
        directory = Path(config.model.hf_checkpoint).expanduser()
        if not (directory / "config.json").is_file():
            raise ConfigError(f"model.hf_checkpoint: {directory} is not an HF checkpoint directory (no config.json)")
        return str(directory / "config.json")
    return None


def _family_of_file(config: RunConfig, host: PluginHost) -> str:
    hf_path = hf_config_path(config)
    if hf_path:
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
        if (world_size // model_parallel) % ep:
            world_size = model_parallel * ep  # a plan (inspect, dry run): the smallest world the EP size fits
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
