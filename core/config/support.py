"""What each config key does on this engine: read by the code that implements it, a backend-only
key with no effect here, or refused with one line. Nothing is accepted and silently ignored.

``KEYS`` classifies every field of the schema (tests/test_config_support.py walks the schema and
fails on a field missing here). ``check_run`` applies the refusals to a resolved run and returns
the notes the run prints at start-up for keys that have no effect on this backend.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from nxdt.errors import ConfigError

if TYPE_CHECKING:
    from nxdt.config.schema import RunConfig
    from nxdt.specs import ModelSpec, RecipeSpec

#: (value, config, spec, recipe) -> why the value cannot be honoured, or None
Check = Callable[[Any, "RunConfig", "ModelSpec", "RecipeSpec | None"], "str | None"]


@dataclass(frozen=True)
class Key:
    """How the engine treats one key."""

    status: str  # read | fixed | family | backend | no_effect | refused
    where: str = ""  # the module that reads it (read), or why it has no effect (no_effect)
    check: Check | None = None  # for read keys: values or combinations that are refused

    def __post_init__(self) -> None:
        assert self.status in ("read", "fixed", "family", "backend", "no_effect", "refused"), self.status
        assert self.status != "fixed" or self.check is not None, (
            "a fixed key needs the check that refuses other values"
        )


def read(where: str, check: Check | None = None) -> Key:
    """A key the module ``where`` reads; ``check`` refuses values it cannot honour."""
    return Key("read", where, check)


def fixed(check: Check) -> Key:
    """A key accepted only with the value that is nxdt's behaviour (``check`` refuses the others)."""
    return Key("fixed", "nxdt.config.support", check)


def refused(reason: str) -> Key:
    """A key (or a whole section) that may not be set: ``reason`` says why."""
    return Key("refused", reason)


def no_effect(reason: str) -> Key:
    """A key that cannot change anything on the torch backend; reported when set."""
    return Key("no_effect", reason)


def _refuse_true(reason: str) -> Check:
    return lambda v, *_: reason if v else None


def _only(*allowed: Any, reason: str = "") -> Check:
    def check(v: Any, *_: Any) -> str | None:
        if v is None or v in allowed:
            return None
        return reason or f"{v!r} is not available; use {' or '.join(map(repr, allowed))}"

    return check


def _use_fast(v: Any, cfg: RunConfig, *_: Any) -> str | None:
    # Megatron's GPT2BPETokenizer is one byte-level BPE over vocab.json + merges.txt: its slow and
    # fast implementations give the same ids, so use_fast=false (megatron_gpt_config.yaml) is honoured.
    if v is False and cfg.data.tokenizer.type != "GPT2BPETokenizer":
        return "slow (Python) tokenizers are not available; nxdt loads fast ones"
    return None


def _pretrain_only(v: Any, cfg: RunConfig, spec: ModelSpec, recipe: RecipeSpec | None) -> str | None:
    # Another task's `pretrain` recipe (masked LM) reads these keys in its own dataset, or refuses them there.
    if v and recipe is not None and recipe.dataset != "pretrain" and recipe.name != "pretrain":
        return f"applies to pre-training data; the {recipe.name} recipe's data does not have it"
    return None


def _reset_pair(v: Any, cfg: RunConfig, spec: ModelSpec, recipe: RecipeSpec | None) -> str | None:
    if cfg.data.reset_position_ids != cfg.data.reset_attention_mask:
        return (
            "reset_position_ids and reset_attention_mask must be set together: the model tells documents apart "
            "by their positions restarting at 0, so it cannot restart one without the other"
        )
    if cfg.data.reset_position_ids and "position_ids" not in spec.inputs:
        return f"the {spec.family} family does not take position_ids"
    return _pretrain_only(v, cfg, spec, recipe)


def _sft_section(v: Any, cfg: RunConfig, spec: ModelSpec, recipe: RecipeSpec | None) -> str | None:
    if v is not None and recipe is not None and recipe.dataset != "sft":
        return f"applies to the sft recipe; this run uses {recipe.name!r}"
    return None


def _sft_data(v: Any, cfg: RunConfig, spec: ModelSpec, recipe: RecipeSpec | None) -> str | None:
    if v is not None and recipe is not None and recipe.dataset not in ("sft", "preference"):
        return f"applies to SFT records and preference pairs; the {recipe.name} recipe reads other data"
    return None


def _preference_section(name: str) -> Check:
    """``model_alignment_strategy.<name>`` configures the recipe of that name (its loss) only."""

    def check(v: Any, cfg: RunConfig, spec: ModelSpec, recipe: RecipeSpec | None) -> str | None:
        if v is not None and recipe is not None and recipe.loss != name:
            return f"applies to the {name} recipe; this run uses {recipe.name!r} (--recipe {name})"
        return None

    return check


def _moe_section(v: Any, cfg: RunConfig, spec: ModelSpec, recipe: RecipeSpec | None) -> str | None:
    if v is not None and v.model_dump(exclude_none=True) and not spec.is_moe:
        return f"only with a mixture-of-experts family; {spec.family} is dense"
    return None


def _expert_parallel(v: Any, cfg: RunConfig, spec: ModelSpec, recipe: RecipeSpec | None) -> str | None:
    if v and v > 1 and not spec.is_moe:
        return f"expert parallelism needs a mixture-of-experts family; {spec.family} is dense"
    return None


def _token_shuffle(v: Any, *_: Any) -> str | None:
    if v is not None and v > 1:
        return "shuffling tokens across data-parallel ranks before routing is not available; leave it unset or 1"
    return None


def _one_dp_rank(v: Any, cfg: RunConfig, *_: Any) -> str | None:
    if v and cfg.distributed_strategy.expert_model_parallel_size > 1:
        # The loading DP rank's experts are not its DP peers' experts.
        return "DP peers hold different experts under expert parallelism, so every rank must load; set it to false"
    return None


def _model_parallel_size(v: Any, cfg: RunConfig, spec: ModelSpec, recipe: RecipeSpec | None) -> str | None:
    ds = cfg.distributed_strategy
    mp = ds.tensor_model_parallel_size * ds.pipeline_model_parallel_size
    if v is not None and v != mp:
        return f"{v} does not match tensor_model_parallel_size x pipeline_model_parallel_size = {mp}"
    return None


def _max_steps(v: Any, cfg: RunConfig, spec: ModelSpec, recipe: RecipeSpec | None) -> str | None:
    epochs = cfg.trainer.max_epochs
    if (v is None or v < 0) and not (epochs and epochs > 0):
        return "set trainer.max_steps, or trainer.max_epochs with trainer.max_steps=-1"
    return None


_T, _E, _D, _M = "nxdt.train.trainer", "nxdt.train.checkpointing", "nxdt.recipes.data", "nxdt.resolve"
_P = "nxdt.recipes.preference"
_NEURON = Key("backend", "the Neuron/XLA runtime")

KEYS: dict[str, Key] = {
    "name": read(_M),
    "model_source": read("nxdt.resolve"),
    "seed": read(_T),
    # trainer
    "trainer.devices": read("nxdt.resolve"),
    "trainer.num_nodes": read("nxdt.resolve"),
    "trainer.max_epochs": read(_T),
    "trainer.max_steps": read(_T, _max_steps),
    "trainer.log_every_n_steps": read(_T),
    "trainer.val_check_interval": read(_T),
    "trainer.check_val_every_n_epoch": read(_T),
    "trainer.num_sanity_val_steps": read(_T),
    "trainer.limit_val_batches": read(_D),
    "trainer.limit_test_batches": read("nxdt.recipes.evaluate"),
    "trainer.gradient_clip_val": read(_T),
    "trainer.skip_nan_steps": read(_T),
    "trainer.lnc": _NEURON,
    "trainer.sequential_move_factor": _NEURON,
    # exp_manager
    "exp_manager.explicit_log_dir": read("nxdt.train.exp_manager"),
    "exp_manager.exp_dir": read("nxdt.train.exp_manager"),
    "exp_manager.name": read("nxdt.train.exp_manager"),
    "exp_manager.version": read("nxdt.train.exp_manager"),
    "exp_manager.resume_if_exists": read(_E),
    "exp_manager.resume_ignore_no_checkpoint": read(_E),
    "exp_manager.resume_from_checkpoint": read(_E),
    "exp_manager.create_tensorboard_logger": read(_T),
    "exp_manager.create_checkpoint_callback": read(_E),
    "exp_manager.checkpoint_callback_params.monitor": read("nxdt.checkpoint.layout"),
    "exp_manager.checkpoint_callback_params.save_top_k": read(_E),
    "exp_manager.checkpoint_callback_params.mode": read(_E),
    "exp_manager.checkpoint_callback_params.save_last": read(_E),
    "exp_manager.checkpoint_callback_params.filename": read(_E),
    "exp_manager.checkpoint_callback_params.model_parallel_size": read(
        "nxdt.config.support", _model_parallel_size
    ),
    "exp_manager.checkpoint_callback_params.every_n_train_steps": read(_E),
    "exp_manager.checkpoint_callback_params.train_time_interval": read(_E),
    "exp_manager.checkpoint_callback_params.use_master_weights_in_ckpt": read("nxdt.checkpoint.dcp_io"),
    "exp_manager.checkpoint_dir": read(_E),
    "exp_manager.async_checkpointing": read(_E),
    "exp_manager.load_from_one_dp_rank": read(_E, _one_dp_rank),
    "exp_manager.save_bf16": fixed(_refuse_true("saving bf16 copies of the weights is not available yet")),
    "exp_manager.log_parameter_norm": read(_T),
    "exp_manager.log_gradient_norm": read(_T),
    "exp_manager.log_local_rank_0_only": no_effect("nxdt logs and writes metrics from global rank 0 only"),
    "exp_manager.enable_recovery_time_instrumentation": read(_T),
    "exp_manager.save_xser": _NEURON,
    "exp_manager.load_xser": _NEURON,
    "exp_manager.ckpt_ptl_version": _NEURON,
    # distributed_strategy
    "distributed_strategy.tensor_model_parallel_size": read("nxdt.resolve"),
    "distributed_strategy.pipeline_model_parallel_size": read("nxdt.resolve"),
    "distributed_strategy.virtual_pipeline_model_parallel_size": read("nxdt.resolve"),
    "distributed_strategy.pipeline_schedule": read("nxdt.parallel.apply"),
    "distributed_strategy.context_parallel_size": read(
        "nxdt.resolve",
        lambda v, *_: "context parallelism is not available yet; set it to 1" if v > 1 else None,
    ),
    "distributed_strategy.expert_model_parallel_size": read("nxdt.resolve", _expert_parallel),
    "distributed_strategy.token_shuffle_group_size": fixed(_token_shuffle),
    "distributed_strategy.zero1": read("nxdt.parallel.apply"),
    "distributed_strategy.sequence_parallel": read("nxdt.resolve"),
    "distributed_strategy.kv_replicator": read("nxdt.resolve"),
    "distributed_strategy.collective_timeout_s": read("nxdt.cli.worker"),
    # data
    "data.micro_batch_size": read(_D),
    "data.global_batch_size": read(_D),
    "data.seq_length": read(_D),
    "data.train_dir": read("nxdt.recipes.datasets"),
    "data.val_dir": read("nxdt.recipes.datasets"),
    "data.test_dir": read("nxdt.recipes.evaluate"),
    "data.dev_choose_samples": read("nxdt.recipes.datasets", _sft_data),
    "data.data_prefix": read("nxdt.recipes.datasets", _pretrain_only),
    "data.splits_string": read("nxdt.recipes.datasets", _pretrain_only),
    "data.index_mapping_dir": no_effect("nxdt builds Megatron sample indices in memory, not in index files"),
    "data.data_impl": fixed(_only("mmap", reason="only the mmap .bin/.idx format is read")),
    "data.skip_warmup": no_effect("nxdt never pre-reads (warms up) the memory-mapped data"),
    "data.num_workers": read(_D),
    "data.seed": read(_D),
    "data.dataloader_type": fixed(
        _only("single", reason="only the 'single' (nxdt's seeded, resumable) sampler is available")
    ),
    "data.reset_position_ids": read("nxdt.recipes.datasets", _reset_pair),
    "data.reset_attention_mask": read("nxdt.recipes.datasets", _reset_pair),
    "data.eod_mask_loss": read("nxdt.recipes.datasets", _pretrain_only),
    "data.validation_drop_last": read(_D),
    "data.no_seqlen_plus_one_input_tokens": fixed(
        _refuse_true("samples of seq_length tokens (without the +1 target) are not available yet")
    ),
    "data.pad_samples_to_global_batch_size": read(_D),
    "data.tokenizer.type": read(_D),
    "data.tokenizer.library": read(_D, _only("huggingface", "megatron", "sentencepiece")),
    "data.tokenizer.model": read(_D),
    "data.tokenizer.vocab_file": read(_D),
    "data.tokenizer.merge_file": read(_D),
    "data.tokenizer.delimiter": fixed(
        lambda v, *_: "delimiter-based tokenizers are not available" if v else None
    ),
    "data.tokenizer.sentencepiece_legacy": fixed(
        _refuse_true("the legacy sentencepiece behaviour is not available")
    ),
    "data.tokenizer.use_fast": fixed(_use_fast),
    # model: architecture keys go to the family (nxdt.modeling.nxdt_keys), which applies or refuses each
    "model.model_config": read(_M),
    "model.hf_checkpoint": read("nxdt.parallel.apply"),
    "model.encoder_seq_length": read(_M),
    "model.moe": read("nxdt.modeling.moe", _moe_section),
    "model.pipeline_cuts": read("nxdt.parallel.pipeline"),
    "model.use_cpu_initialization": read("nxdt.parallel.apply"),
    "model.weight_init_only": read(_E),
    "model.activations_checkpoint_granularity": read("nxdt.parallel.apply"),
    "model.activations_checkpoint_recompute": read("nxdt.parallel.apply"),
    "model.do_layer_norm_weight_decay": read(_T),
    "model.transpose_nki_inputs": _NEURON,
    "model.fusions.flash_attention": read(_T),
    "model.fusions.ring_attention": fixed(
        _refuse_true("ring attention (context parallelism) is not available yet")
    ),
    "model.fusions.softmax": _NEURON,
    "model.fusions.torch_compile": read("nxdt.parallel.apply"),
    "model.optim.name": read("nxdt.train.optim"),
    "model.optim.lr": read("nxdt.train.optim"),
    "model.optim.weight_decay": read("nxdt.train.optim"),
    "model.optim.betas": read("nxdt.train.optim"),
    "model.optim.eps": read("nxdt.train.optim"),
    "model.optim.capturable": read("nxdt.train.optim"),
    "model.optim.sched.name": read("nxdt.train.schedules"),
    "model.optim.sched.warmup_steps": read("nxdt.train.schedules"),
    "model.optim.sched.max_steps": read("nxdt.train.schedules"),
    "model.optim.sched.constant_steps": read("nxdt.train.schedules"),
    "model.optim.sched.min_lr": read("nxdt.train.schedules"),
    # model_alignment_strategy
    "model_alignment_strategy.sft": read("nxdt.recipes.datasets", _sft_section),
    "model_alignment_strategy.sft.packing": read("nxdt.recipes.datasets"),
    "model_alignment_strategy.sft.evaluate_before_training": read(_T),
    "model_alignment_strategy.dpo": read(_P, _preference_section("dpo")),
    "model_alignment_strategy.dpo.kl_beta": read(_P),
    "model_alignment_strategy.dpo.loss_type": read(_P, _only("sigmoid", "hinge", "ipo")),
    "model_alignment_strategy.dpo.max_prompt_length": read(_P),
    "model_alignment_strategy.dpo.precompute_ref_log_probs": read(_P),
    "model_alignment_strategy.dpo.truncation_mode": read(_P),
    "model_alignment_strategy.orpo": read(_P, _preference_section("orpo")),
    "model_alignment_strategy.orpo.beta": read(_P),
    "model_alignment_strategy.orpo.max_prompt_length": read(_P),
    "model_alignment_strategy.orpo.truncation_mode": read(_P),
    "model_alignment_strategy.peft.lora_rank": read("nxdt.peft.lora"),
    "model_alignment_strategy.peft.lora_alpha": read("nxdt.peft.lora"),
    "model_alignment_strategy.peft.lora_dropout": read("nxdt.peft.lora"),
    "model_alignment_strategy.peft.lora_bias": read("nxdt.peft.lora"),
    "model_alignment_strategy.peft.target_modules": read("nxdt.peft.lora"),
    "model_alignment_strategy.peft.lora_verbose": read("nxdt.parallel.apply"),
    "model_alignment_strategy.peft.load_lora_from_ckpt": read("nxdt.peft.checkpoint"),
    "model_alignment_strategy.peft.save_lora_base": read("nxdt.peft.checkpoint"),
    "model_alignment_strategy.peft.merge_lora": read("nxdt.peft.checkpoint"),
    "model_alignment_strategy.peft.save_lora_config_adapter": read("nxdt.peft.checkpoint"),
    "model_alignment_strategy.peft.merge_sharded_lora": read("nxdt.peft.checkpoint"),
    # precision
    "precision.type": read("nxdt.config.sections_precision"),
    "precision.master_weights": read("nxdt.config.sections_precision"),
    "precision.fp32_grad_acc": read("nxdt.config.sections_precision"),
    "precision.param_dtype": read("nxdt.config.sections_precision"),
    "precision.stochastic_rounding": read("nxdt.config.sections_precision"),
    "precision.xla_use_bf16": _NEURON,
    "precision.xla_downcast_bf16": _NEURON,
    "precision.neuron_rt_stochastic_rounding_en": _NEURON,
    "precision.fp32_grads_cc": _NEURON,
    "precision.parallel_layers_reduce_dtype": _NEURON,
    "compiler_flags": _NEURON,
    "compiler_cache_url": _NEURON,
    "aync_exec_max_inflight_requests": _NEURON,
    "bucket_size_collectives": _NEURON,
    "neuron_rt_exec_timeout": _NEURON,
    "neuron_experimental_compress_rg": _NEURON,
}

#: ``model.*`` architecture keys the kit's families read or refuse (nxdt.modeling.nxdt_keys).
FAMILY = Key("family", "nxdt.modeling.nxdt_keys")


def key_rule(path: str) -> Key | None:
    """The rule of dotted ``path``: its own, the family's for architecture keys, else its section's."""
    if path in KEYS:
        return KEYS[path]
    from nxdt.config.sections_model import ARCHITECTURE_KEYS

    if path.count(".") == 1 and path.startswith("model.") and path.split(".")[1] in ARCHITECTURE_KEYS:
        return FAMILY
    parent = path.rpartition(".")[0]
    while parent:
        if parent in KEYS:
            return KEYS[parent]  # a section judged as a whole (model.moe, model_alignment_strategy.peft)
        parent = parent.rpartition(".")[0]
    return None


def _value(cfg: Any, path: str) -> tuple[bool, Any]:
    """(whether the key holds a value other than its default, its value)."""
    node = cfg
    parts = path.split(".")
    for part in parts[:-1]:
        node = getattr(node, _attr(node, part), None)
        if node is None:
            return False, None
    attr = _attr(node, parts[-1])
    value = getattr(node, attr, None)
    field = type(node).model_fields.get(attr) if hasattr(type(node), "model_fields") else None
    default = field.get_default(call_default_factory=True) if field is not None else None
    return value != default, value


def _attr(node: Any, key: str) -> str:
    fields = type(node).model_fields if hasattr(type(node), "model_fields") else {}
    for name, field in fields.items():
        if field.alias == key:
            return name
    return key


def no_effect_keys(cfg: RunConfig) -> list[tuple[str, str]]:
    """(dotted key, why) for every key set that has no effect on the torch backend."""
    from nxdt.modeling.nxdt_keys import NO_EFFECT_KEYS

    found = [
        (path, rule.where)
        for path, rule in KEYS.items()
        if rule.status == "no_effect" and _value(cfg, path)[0]
    ]
    for key in NO_EFFECT_KEYS:
        explicit, value = _value(cfg, f"model.{key}")
        if explicit and value:
            found.append((f"model.{key}", _NO_EFFECT_MODEL[key]))
    return found


def check_run(cfg: RunConfig, spec: ModelSpec, recipe: RecipeSpec | None) -> list[str]:
    """Refuse (ConfigError, one line) what this run cannot honour; return notes on keys with no effect here."""
    for path, rule in KEYS.items():
        _, value = _value(cfg, path)
        if rule.status == "refused":
            if value is not None:
                raise ConfigError(f"{path}: {rule.where}")
        elif rule.status in ("read", "fixed") and rule.check is not None:
            problem = rule.check(value, cfg, spec, recipe)
            if problem:
                raise ConfigError(f"{path}={_short(value)}: {problem}")
    return [f"{path} has no effect on the torch backend: {why}" for path, why in no_effect_keys(cfg)]


def architecture_notes(cfg: RunConfig, arch: Any) -> list[str]:
    """Notes on keys set that the resolved architecture makes inert (it may come from a config.json)."""
    moe, section = getattr(arch, "moe", None), cfg.model.moe
    if moe is None or section is None or not section.router_aux_loss_coef or moe.output_router_logits:
        return []
    # transformers and NxDT add the load-balancing loss only with output_router_logits; so does nxdt
    return ["model.moe.router_aux_loss_coef has no effect: the load-balancing loss enters training only with "
            "model.moe.output_router_logits=true"]


_NO_EFFECT_MODEL = {
    "persist_layer_norm": "it selects an Apex kernel; nxdt's norms are torch's",
    "apply_query_key_layer_scaling": "an fp16 overflow guard that cancels out; nxdt computes softmax in fp32",
    "qkv_linear": "nxdt's q/k/v projections always support KV-head replication (kv_replicator)",
}


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else type(value).__name__
