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
    "sequence_output",  # kept whole; under SP its output is split along the sequence (learned positions)
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
    """Everything the engine needs to know about one model family (docs/plugins.md, "model contract").

    ``config_from_nxdt(model_section, base=None)`` receives the NxDT ``model`` keys that are set
    (num_layers, hidden_size, ...) and returns the family's architecture config: ``base`` (a config
    read from an HF config.json) with those keys applied, or the family defaults with them; it
    raises ValueError for a key the family cannot honour. ``config_from_hf`` / ``config_to_hf``
    translate HF ``config.json`` dicts. ``build_model`` must work under ``torch.device("meta")``;
    ``init_weights(model, config)`` then fills real tensors.

    The engine calls the model as ``model(**inputs)`` with the batch keys named in ``inputs`` (on
    every path: one process, DP, TP, PP and evaluation). Under pipeline parallelism the first stage
    receives ``input_ids`` and later stages the previous stage's hidden states in its place, and
    every input in ``stage_inputs`` reaches every stage.
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
    task: str = "causal_lm"
    is_moe: bool = False
    #: module FQNs (or globs) of the repeated blocks, in order: pipeline split points
    pipeline_blocks: Callable[[Any], list[str]] | None = None
    #: PEFT target name (as in NxDT configs, e.g. ``qkv_proj``, or an HF name such as ``q_proj``) -> module globs
    peft_targets: Mapping[str, Sequence[str]] = field(default_factory=dict)
    #: module classes that ``activations_checkpoint_recompute`` may name, e.g. CoreAttention
    recompute_modules: Mapping[str, type] = field(default_factory=dict)
    #: counts only the parameters a token uses (MoE); None means all parameters are active
    active_parameters: Callable[[Any], int] | None = None
    plugin: str = ""
    # -- added in plugin API 2 ------------------------------------------------------------------
    #: the keyword inputs ``forward`` accepts, in the batch's names
    inputs: tuple[str, ...] = ("input_ids", "position_ids")
    #: the inputs every pipeline stage needs (masks, positions); the rest only reach the first stage's use
    stage_inputs: tuple[str, ...] = ("position_ids",)
    #: exact parameter count from the config alone (no build); None: count a meta-device build
    num_parameters: Callable[[Any], int] | None = None
    #: the recipe ``nxdt run PRESET`` uses without ``--recipe``; None: ``sft`` for causal LMs, else ``pretrain``
    default_recipe: str | None = None
    #: ``init_parameter(module, name, shape, config, generator) -> Tensor``: the single-device initial
    #: value of ``module``'s parameter ``name`` (one expert's for stacked experts). With it every rank
    #: allocates and initialises only its own shards, identically whatever the layout; None:
    #: ``init_weights`` on the whole model before sharding
    init_parameter: Callable[[nn.Module, str, tuple[int, ...], Any, torch.Generator], torch.Tensor] | None = None

    @property
    def recipe_default(self) -> str:
        """The recipe a preset of this family runs when none is named."""
        return self.default_recipe or ("sft" if self.task == "causal_lm" else "pretrain")


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
    #: recipe name -> a config layer applied after ``defaults`` when that recipe runs (a tiny preset's
    #: settings that only make sense for one recipe, such as ORPO's beta for the embedded demo)
    recipe_defaults: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


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
    """A named objective: ``build(run_config, model_spec)`` returns an :class:`Objective`.

    Plugin API 1 losses return ``loss(logits, batch) -> (sum_of_token_losses, token_count)``
    instead; the engine wraps them (their normaliser is the count of labels that are not -100).
    """

    name: str
    build: Callable[..., Any]
    families: tuple[str, ...] = ()
    description: str = ""
    plugin: str = ""


@dataclass
class LossOutput:
    """What an objective returns for one micro-batch.

    ``loss`` is a *sum* over the micro-batch's units (tokens for LM, pairs for DPO), so that the
    engine can divide by the units of the whole global batch whatever the accumulation and
    data-parallel split. ``metrics`` maps a name to ``(sum, count)``; the trainer logs
    ``sum / count`` over the global batch (masked-token accuracy, reward margins, aux losses).
    """

    loss: torch.Tensor
    metrics: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


class Objective(Protocol):
    """A recipe's training objective: its loss, its normaliser and its metrics."""

    def count(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Units this micro-batch contributes to the global normaliser (known before the forward)."""
        ...

    def __call__(self, outputs: Any, batch: Mapping[str, torch.Tensor]) -> LossOutput:
        """The loss sum and metrics of one micro-batch from the model's outputs and the whole batch."""
        ...


@dataclass(frozen=True)
class RecipeSpec:
    """A training recipe: config defaults, the dataset and objective it uses, the tasks it trains.

    Recipes select models by ``tasks`` (the ModelSpec's ``task``: ``causal_lm``, ``masked_lm``,
    ...). Two recipes may share a name when they serve different tasks: ``nxdt run bert-tiny
    --recipe pretrain`` picks the masked-LM one. ``families`` (plugin API 1) still restricts a
    recipe to named families when set.
    """

    name: str
    description: str
    defaults: Mapping[str, Any]
    dataset: str
    loss: str
    families: tuple[str, ...] = ()  # empty: any family of a supported task
    plugin: str = ""
    #: optional task metrics before and after training: ``evaluate(trainer) -> {name: value}``
    evaluate: Callable[[Any], dict[str, float]] | None = None
    #: the ModelSpec tasks this recipe trains; empty: any task (plugin API 1 recipes)
    tasks: tuple[str, ...] = ()

    def supports(self, spec: ModelSpec | str) -> bool:
        """Whether this recipe can train ``spec`` (a ModelSpec, or a family name for API 1 callers)."""
        family = spec if isinstance(spec, str) else spec.family
        if self.families and family not in self.families:
            return False
        if isinstance(spec, str) or not self.tasks:
            return True
        return spec.task in self.tasks
