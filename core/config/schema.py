"""Typed models of the NxDT/NeMo run YAML; every section rejects unknown keys.

Neuron-runtime keys of upstream configs are accepted (so those files validate unchanged) and
``RunConfig.unused_keys`` lists the ones a given backend ignores; ``nxdt.config.support`` says what
every other key does, and refuses values the engine cannot honour.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, Field, model_validator

from nxdt.config.sections_base import Section, Str, backend_only
from nxdt.config.sections_model import ModelSection
from nxdt.config.sections_precision import PrecisionSection

Count = Annotated[int, Field(ge=1)]


class TrainerSection(Section):
    """``trainer``: world shape, step budget, logging/validation cadence (PyTorch-Lightning names)."""

    devices: Count = 1  # processes per node
    num_nodes: Count = 1
    max_epochs: int | None = None  # -1 / None: max_steps decides
    max_steps: int = 1000
    log_every_n_steps: Count = 10
    val_check_interval: int | float | None = None  # validate every N steps; None: only at the end
    check_val_every_n_epoch: int | None = None
    num_sanity_val_steps: int = Field(0, ge=0)
    limit_val_batches: int | float = Field(1.0, ge=0)  # a count of batches, or a fraction when float
    # the recipe's task evaluation on data.test_dir: a count of global batches, a fraction, 0 = none;
    # None: up to nxdt.recipes.evaluate.MAX_EVAL_ROWS rows
    limit_test_batches: int | float | None = Field(None, ge=0)
    gradient_clip_val: float | None = Field(1.0, ge=0)  # None or 0: no clipping
    skip_nan_steps: int = Field(0, ge=0)  # NaN/Inf-loss steps to skip before stopping the run
    lnc: int | None = backend_only("neuron")  # trn2 logical NeuronCore size
    sequential_move_factor: int | None = backend_only("xla", "neuron")


class CheckpointCallbackParams(Section):
    """``exp_manager.checkpoint_callback_params``: when and how many checkpoints to keep."""

    monitor: str = "step"
    save_top_k: int = Field(1, ge=-1)  # -1 keeps every checkpoint
    mode: Literal["min", "max"] = "max"
    save_last: bool = False
    filename: str | None = None  # e.g. 'run--{step}-{consumed_samples}'
    model_parallel_size: int | None = None
    every_n_train_steps: int | None = Field(None, ge=0)
    train_time_interval: float | None = Field(None, gt=0)  # seconds between checkpoints
    # None (nxdt's default) or True: master-weight modes save the fp32 master (bitwise resume);
    # False: they do not, and a resume takes the saved bf16 weights as the master
    use_master_weights_in_ckpt: bool | None = None

    def saves_last_step(self) -> bool:
        """``save_last``, which counts as true when the config leaves it unset (NeMo's exp_manager default)."""
        return self.save_last if "save_last" in self.model_fields_set else True

    def saves_any(self) -> bool:
        """Whether these settings write any checkpoint: every N steps, every T seconds, or at the end."""
        return bool(self.every_n_train_steps or self.train_time_interval or self.saves_last_step())


class ExpManagerSection(Section):
    """``exp_manager``: run directory, loggers, checkpointing and resume."""

    explicit_log_dir: str | None = None
    exp_dir: str | None = None
    name: str | None = None  # None: the top-level name
    version: Str | None = None
    resume_if_exists: bool = False
    resume_ignore_no_checkpoint: bool = False
    resume_from_checkpoint: str | None = None
    create_tensorboard_logger: bool = True
    create_checkpoint_callback: bool = True
    checkpoint_callback_params: CheckpointCallbackParams = Field(default_factory=CheckpointCallbackParams)
    checkpoint_dir: str | None = None  # where checkpoints go (a path or s3://bucket/prefix)
    async_checkpointing: bool = False
    load_from_one_dp_rank: bool = False  # one DP rank reads, then broadcasts
    save_bf16: bool = False
    log_parameter_norm: bool = False
    log_gradient_norm: bool = False
    log_local_rank_0_only: bool = False
    enable_recovery_time_instrumentation: bool = False
    save_xser: bool | None = backend_only("xla", "neuron")  # torch-xla serialization
    load_xser: bool | None = backend_only("xla", "neuron")
    ckpt_ptl_version: Str | None = backend_only("neuron")  # PyTorch-Lightning version of NxDT checkpoints


class DistributedStrategySection(Section):
    """``distributed_strategy``: parallel degrees; data parallelism fills the rest of the world."""

    tensor_model_parallel_size: Count = 1
    pipeline_model_parallel_size: Count = 1
    virtual_pipeline_model_parallel_size: Count = 1  # model chunks per pipeline rank (interleaved 1F1B)
    # a torch.distributed.pipelining schedule name (1F1B, Interleaved1F1B, GPipe, InterleavedZeroBubble, ...);
    # None: Interleaved1F1B with virtual stages, else 1F1B
    pipeline_schedule: str | None = None
    context_parallel_size: Count = 1
    expert_model_parallel_size: Count = 1
    token_shuffle_group_size: int | None = Field(None, ge=1)  # NxD MoE token shuffling; only 1 (none) here
    zero1: bool = False  # shard optimizer state over data parallel ranks
    sequence_parallel: bool = False
    kv_replicator: int | None = Field(None, ge=1)  # KV-head replication when TP exceeds the KV heads
    # seconds any collective waits for the other ranks before the job fails naming the stuck rank
    collective_timeout_s: int = Field(600, ge=1)


class TokenizerSection(Section):
    """``data.tokenizer``: an HF tokenizer path/id in ``type``, or a Megatron tokenizer and its files."""

    type: str | None = None
    library: str | None = None  # huggingface, megatron, sentencepiece
    model: str | None = None  # sentencepiece model file
    vocab_file: str | None = None
    merge_file: str | None = None
    delimiter: str | None = None
    sentencepiece_legacy: bool = False
    use_fast: bool | None = None


def _check_data_prefix(value: Any) -> Any:
    """Megatron ``data_prefix``: a path, [path, ...], [weight, path, ...] or {train, validation, test: ...}."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict):
        for split in value:
            if split not in ("train", "validation", "test"):
                raise ValueError(f"data_prefix split {split!r} is not one of train, validation, test")
        return {split: _check_data_prefix(v) for split, v in value.items()}
    if isinstance(value, list) and value:
        if all(isinstance(p, str) for p in value):
            return value
        weights, paths = value[0::2], value[1::2]
        numeric = all(isinstance(w, int | float) and not isinstance(w, bool) and w >= 0 for w in weights)
        if len(value) % 2 == 0 and numeric and all(isinstance(p, str) for p in paths):
            return value
    raise ValueError("data_prefix must be a path, [path, ...] or [weight, path, weight, path, ...]")


class DataSection(Section):
    """``data``: batch sizes, sequence length, dataset locations and the tokenizer."""

    micro_batch_size: Count = 1
    global_batch_size: Count = 8
    seq_length: Count = 2048
    train_dir: str | None = None  # jsonl/arrow/parquet file or directory, or an HF dataset
    val_dir: str | None = None
    test_dir: str | None = None  # held-out rows for the recipe's task metrics (SFT exact match)
    dev_choose_samples: int | None = Field(None, ge=1)  # use only the first N records
    data_prefix: Annotated[Any, AfterValidator(_check_data_prefix)] = None  # Megatron .bin/.idx prefixes
    splits_string: str | None = None  # train,validation,test weights, e.g. "980,10,10"
    index_mapping_dir: str | None = None
    data_impl: str = "mmap"
    skip_warmup: bool = True
    num_workers: int = Field(0, ge=0)
    seed: int | None = None  # None: the top-level seed
    dataloader_type: Literal["single", "cyclic"] = "single"
    reset_position_ids: bool = False
    reset_attention_mask: bool = False
    eod_mask_loss: bool = False
    validation_drop_last: bool = True
    no_seqlen_plus_one_input_tokens: bool = False
    pad_samples_to_global_batch_size: bool = False
    tokenizer: TokenizerSection = Field(default_factory=TokenizerSection)


TruncationMode = Literal["keep_start", "keep_end"]


class SftSection(Section):
    """``model_alignment_strategy.sft``."""

    packing: bool = False  # concatenate records up to seq_length instead of padding each
    evaluate_before_training: bool = True  # score the task metrics on the untrained model too


class DpoSection(Section):
    """``model_alignment_strategy.dpo``."""

    kl_beta: float = Field(0.01, gt=0)
    loss_type: str = "sigmoid"
    max_prompt_length: int | None = Field(None, ge=1)
    precompute_ref_log_probs: bool = True
    truncation_mode: TruncationMode = "keep_start"


class OrpoSection(Section):
    """``model_alignment_strategy.orpo``."""

    beta: float = Field(0.1, gt=0)
    max_prompt_length: int | None = Field(None, ge=1)
    truncation_mode: TruncationMode = "keep_start"


class PeftSection(Section):
    """``model_alignment_strategy.peft``: LoRA."""

    lora_rank: Count = 16
    lora_alpha: float = Field(32, gt=0)
    lora_dropout: float = Field(0.05, ge=0, le=1)
    lora_bias: Literal["none", "all", "lora_only"] = "none"
    lora_verbose: bool = False
    target_modules: list[str] | None = None  # NxDT names (qkv_proj, o_proj, ...); None: the family's default
    load_lora_from_ckpt: bool = False
    save_lora_base: bool = False
    merge_lora: bool = False
    save_lora_config_adapter: bool = True
    merge_sharded_lora: bool = False


class ModelAlignmentSection(Section):
    """``model_alignment_strategy``: at most one of sft/dpo/orpo, optionally with peft (LoRA)."""

    sft: SftSection | None = None
    dpo: DpoSection | None = None
    orpo: OrpoSection | None = None
    peft: PeftSection | None = None

    @model_validator(mode="after")
    def _one_objective(self) -> ModelAlignmentSection:
        chosen = [k for k in ("sft", "dpo", "orpo") if getattr(self, k) is not None]
        if len(chosen) > 1:
            raise ValueError(f"set only one of sft, dpo, orpo (got {', '.join(chosen)})")
        return self


class RunConfig(Section):
    """One validated run: the whole NxDT YAML after layering, overrides and interpolation."""

    name: str = "nxdt"
    model_source: Literal["hf", "megatron"] = "hf"
    seed: int = 1234
    trainer: TrainerSection = Field(default_factory=TrainerSection)
    exp_manager: ExpManagerSection = Field(default_factory=ExpManagerSection)
    distributed_strategy: DistributedStrategySection = Field(default_factory=DistributedStrategySection)
    data: DataSection = Field(default_factory=DataSection)
    model: ModelSection = Field(default_factory=ModelSection)
    model_alignment_strategy: ModelAlignmentSection | None = None
    precision: PrecisionSection = Field(default_factory=PrecisionSection)

    # Neuron compiler/runtime settings, kept at the top level where NxDT puts them.
    compiler_flags: str | None = backend_only("neuron")
    compiler_cache_url: str | None = backend_only("neuron")
    aync_exec_max_inflight_requests: int | None = backend_only("neuron")  # [sic] upstream spelling
    bucket_size_collectives: int | None = backend_only("neuron")
    neuron_rt_exec_timeout: int | None = backend_only("neuron")
    neuron_experimental_compress_rg: bool | None = backend_only("neuron")

    def unused_keys(self, backend: str = "torch") -> list[str]:
        """Dotted paths of keys that were set but that ``backend`` ignores (Neuron/XLA-only keys)."""
        used_anyway = {f"precision.{k}" for k in self.precision.neuron_keys_read()}
        unused = [key for key, backends in self.backend_keys() if backend not in backends and key not in used_anyway]
        if backend == "torch":
            from nxdt.config.support import no_effect_keys

            # Keys torch has no use for (Apex kernels, index files): accepted, and said to do nothing here.
            unused += [key for key, _ in no_effect_keys(self)]
        return unused

    def to_dict(self) -> dict[str, Any]:
        """The resolved config as plain data, with YAML key names."""
        return self.model_dump(mode="json", by_alias=True)

    def to_yaml(self) -> str:
        """The resolved config as YAML; loading it back gives an equal RunConfig."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False)
