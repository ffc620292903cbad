"""The objects plugins register: model families, presets, datasets, losses and recipes.

Hooks hand a ``register`` callable to each plugin; the plugin registers these plain objects and
the objects carry the behaviour. The engine reads them and never imports model code itself.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

if TYPE_CHECKING:
    import torch
    from torch import nn

#: The parallel styles a shard plan may name. The engine maps each to a
#: ``torch.distributed.tensor.parallel`` style; plans stay plain data.
SHARD_STYLES = (
    "colwise",  # split the output features (QKV, gate, up); output stays sharded on heads
    "rowwise",  # split the input features (attention output, down); output is reduced
    "embedding",  # vocabulary-parallel embedding (rows split, output all-reduced)
    "lm_head",  # vocabulary-parallel output layer; logits stay sharded for loss-parallel CE
    "sequence_norm",  # norm over a sequence-sharded activation (sequence parallelism only)
    "replicate",  # kept whole on every rank (routers, small biases)
    "expert",  # expert-parallel: the leading expert dimension is split over the EP group
)


@dataclass(frozen=True)
class ParallelDims:
    """The sizes of each parallel dimension of a run (what a shard plan may depend on)."""

    dp: int = 1
    tp: int = 1
    pp: int = 1
    ep: int = 1
    cp: int = 1
    vpp: int = 1
    sequence_parallel: bool = False
    kv_replicator: int = 1

    @property
    def world_size(self) -> int:
        """The number of ranks these dimensions span (EP is carved out of DP)."""
        return self.dp * self.tp * self.pp * self.cp


@dataclass(frozen=True)
class ShardPlan:
    """A family's tensor-parallel plan as data: FQN glob -> one of ``SHARD_STYLES``.

    Globs use ``fnmatch`` syntax against module names of the single-device model
    (``layers.*.attention.wq``). ``sequence_parallel`` holds the extra rules applied only when
    sequence parallelism is on. ``kv_projections`` names the modules that produce K and V so the
    engine can replicate KV heads when the TP size exceeds their number.
    """

    rules: Mapping[str, str]
    sequence_parallel: Mapping[str, str] = field(default_factory=dict)
    kv_projections: Sequence[str] = ()
    notes: str = ""

    def __post_init__(self) -> None:
        for table in (self.rules, self.sequence_parallel):
            for glob, style in table.items():
                if style not in SHARD_STYLES:
                    raise ValueError(f"shard plan rule {glob!r}: unknown style {style!r}; one of {SHARD_STYLES}")

    def as_dict(self, sequence_parallel: bool = False) -> dict[str, str]:
        """The rules in force, sequence-parallel ones included when asked."""
        rules = dict(self.rules)
        if sequence_parallel:
            rules.update(self.sequence_parallel)
        return rules


class StateDictAdapter(Protocol):
    """Converts between nxdt's and Hugging Face's state-dict key names and layouts."""

    def to_hf(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """nxdt -> HF names and layouts."""
        ...

    def from_hf(self, hf_state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """HF -> nxdt names and layouts."""
        ...


@dataclass(frozen=True)
class ModelSpec:
    """Everything the engine needs to know about one model family.

    ``config_from_nxdt(model_section, base=None)`` receives the NxDT ``model`` keys that are set
    (num_layers, hidden_size, ...) and returns the family's architecture config: ``base`` (a config
    read from an HF config.json) with those keys applied, or the family defaults with them;
    ``config_from_hf`` / ``config_to_hf`` translate HF ``config.json`` dicts. ``build_model`` must
    work under ``torch.device("meta")``; ``init_weights(model, config)`` then fills real tensors.
    """

    family: str
    config_class: type
    build_model: Callable[[Any], nn.Module]
    init_weights: Callable[[nn.Module, Any], None]
    config_from_nxdt: Callable[..., Any]
    config_from_hf: Callable[[Mapping[str, Any]], Any]
    config_to_hf: Callable[[Any], dict[str, Any]]
    shard_plan: Callable[[Any, ParallelDims], ShardPlan]
    state_dict_adapter: Callable[[Any], StateDictAdapter]
    flops_per_token: Callable[[Any, int], float]
    hf_model_types: tuple[str, ...] = ()
    hf_architecture: str = ""
    task: Literal["causal_lm", "masked_lm"] = "causal_lm"
    is_moe: bool = False
    #: module FQNs (or globs) of the repeated blocks, in order: pipeline split points
    pipeline_blocks: Callable[[Any], list[str]] | None = None
    #: PEFT target name (as in NxDT configs, e.g. ``qkv_proj``) -> module-name globs
    peft_targets: Mapping[str, Sequence[str]] = field(default_factory=dict)
    #: module classes that ``activations_checkpoint_recompute`` may name, e.g. CoreAttention
    recompute_modules: Mapping[str, type] = field(default_factory=dict)
    #: counts only the parameters a token uses (MoE); None means all parameters are active
    active_parameters: Callable[[Any], int] | None = None
    plugin: str = ""


@dataclass(frozen=True)
class PresetSpec:
    """A named model preset: a family plus architecture keys and defaults."""

    name: str
    family: str
    plugin: str
    style: Literal["hf", "megatron"]
    hf_model_id: str
    architecture: Mapping[str, Any]
    distributed_strategy: Mapping[str, Any] = field(default_factory=dict)
    reference_machine: str = ""
    seq_length: int = 2048
    defaults: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""
    source: str = "hub_registry.toml"


@dataclass(frozen=True)
class DatasetSpec:
    """A named dataset builder: ``build(run_config, tokenizer, split, **ctx) -> torch Dataset``."""

    name: str
    build: Callable[..., Any]
    families: tuple[str, ...] = ()  # empty: any family
    description: str = ""
    plugin: str = ""


@dataclass(frozen=True)
class LossSpec:
    """A named loss: ``build(run_config, model_spec) -> callable(logits, batch, model) -> (loss, n_tokens)``."""

    name: str
    build: Callable[..., Any]
    families: tuple[str, ...] = ()
    description: str = ""
    plugin: str = ""


@dataclass(frozen=True)
class RecipeSpec:
    """A training recipe: config defaults, the dataset and loss it uses, the families it supports."""

    name: str
    description: str
    defaults: Mapping[str, Any]
    dataset: str
    loss: str
    families: tuple[str, ...] = ()  # empty: any family
    plugin: str = ""
    #: optional task metrics after training: ``evaluate(trainer) -> {name: value}``
    evaluate: Callable[[Any], dict[str, float]] | None = None

    def supports(self, family: str) -> bool:
        """Whether this recipe can train models of ``family``."""
        return not self.families or family in self.families
