"""The ``model`` section: architecture keys (None = not set), fusions, optimizer, schedule and MoE."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from nxdt.config.sections_base import Section, backend_only

#: Architecture keys of ``model``: when set they override the preset / HF config.json values.
ARCHITECTURE_KEYS: tuple[str, ...] = (
    "encoder_seq_length",
    "max_position_embeddings",
    "num_layers",
    "hidden_size",
    "ffn_hidden_size",
    "num_attention_heads",
    "num_kv_heads",
    "kv_channels",
    "vocab_size",
    "type_vocab_size",
    "bert_binary_head",
    "init_method_std",
    "use_scaled_init_method",
    "hidden_dropout",
    "attention_dropout",
    "ffn_dropout",
    "apply_query_key_layer_scaling",
    "normalization",
    "layernorm_epsilon",
    "make_vocab_size_divisible_by",
    "persist_layer_norm",
    "share_embeddings_and_output_weights",
    "position_embedding_type",
    "rotary_percentage",
    "rope_theta",
    "rope_scaling",
    "activation",
    "transformer_block_type",
    "has_bias",
    "qkv_linear",
    "fuse_qkv",
    "fuse_gate_up",
)

Probability = float | None


class FusionsSection(Section):
    """``model.fusions``: fused kernels."""

    flash_attention: bool = True
    ring_attention: bool = False  # context parallelism through ring attention
    softmax: bool | None = backend_only("neuron")  # NxDT's custom fused softmax operator
    torch_compile: bool = False  # nxdt's addition: torch.compile per transformer block (inductor)


class SchedSection(Section):
    """``model.optim.sched``: the learning-rate schedule (NeMo names)."""

    name: str = "CosineAnnealing"
    warmup_steps: int = Field(0, ge=0)
    max_steps: int | None = None  # None or -1: the run's step count (trainer.max_steps, or epochs x steps)
    constant_steps: int = Field(0, ge=0)
    min_lr: float = Field(0.0, ge=0)


class OptimSection(Section):
    """``model.optim``: the optimizer (``adamw``, ``adamw_fp32OptState``, ...) and its schedule."""

    name: str = "adamw"
    lr: float = Field(3e-4, ge=0)
    weight_decay: float = Field(0.01, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(1e-8, gt=0)
    capturable: bool = False
    sched: SchedSection = Field(default_factory=SchedSection)


class MoeSection(Section):
    """``model.moe``: mixture-of-experts architecture; like the other architecture keys, None = not set."""

    num_experts: int | None = Field(None, ge=1)
    frequency: int | None = Field(None, ge=1)  # every `frequency`-th layer is MoE
    dropout: Probability = Field(None, ge=0, le=1)
    capacity_factor: float | None = None  # None (or 0 with dropless) = no token dropping
    dropless: bool | None = None
    routing_algorithm: Literal["top_k", "sinkhorn"] | None = None
    router_activation: Literal["softmax", "sigmoid"] | None = None
    sinkhorn_iterations: int | None = None
    sinkhorn_tol: float | None = None
    top_k: int | None = Field(None, ge=1)
    output_router_logits: bool | None = None
    router_aux_loss_coef: float | None = None
    router_z_loss_coef: float | None = None  # ST-MoE router z-loss (nxdt's addition; with output_router_logits)
    normalize_top_k_affinities: bool | None = None


class ModelSection(Section):
    """``model``: architecture (None = from the preset or config.json), memory options and optimizer."""

    # `model_config` is reserved by pydantic, so the attribute is model_config_path.
    model_config_path: str | None = Field(None, alias="model_config")  # an HF config.json
    hf_checkpoint: str | None = None  # an HF model directory (safetensors) to start from

    encoder_seq_length: int | None = Field(None, ge=1)
    max_position_embeddings: int | None = Field(None, ge=1)
    num_layers: int | None = Field(None, ge=1)
    hidden_size: int | None = Field(None, ge=1)
    ffn_hidden_size: int | None = Field(None, ge=1)
    num_attention_heads: int | None = Field(None, ge=1)
    num_kv_heads: int | None = Field(None, ge=1)
    kv_channels: int | None = Field(None, ge=1)  # head dim; None = hidden_size // num_attention_heads
    vocab_size: int | None = Field(None, ge=1)
    type_vocab_size: int | None = Field(None, ge=0)  # BERT token types
    bert_binary_head: bool | None = None  # BERT's next-sentence head (pooler + classifier), Megatron's name
    init_method_std: float | None = Field(None, gt=0)
    use_scaled_init_method: bool | None = None
    hidden_dropout: Probability = Field(None, ge=0, le=1)
    attention_dropout: Probability = Field(None, ge=0, le=1)
    ffn_dropout: Probability = Field(None, ge=0, le=1)
    apply_query_key_layer_scaling: bool | None = None
    normalization: Literal["rmsnorm", "layernorm"] | None = None
    layernorm_epsilon: float | None = Field(None, gt=0)
    make_vocab_size_divisible_by: int | None = Field(None, ge=1)
    persist_layer_norm: bool | None = None
    share_embeddings_and_output_weights: bool | None = None
    position_embedding_type: Literal["learned_absolute", "rope"] | None = None
    rotary_percentage: float | None = Field(None, gt=0, le=1)
    rope_theta: float | None = Field(None, gt=0)
    rope_scaling: dict[str, Any] | None = None  # as in HF config.json (rope_type, factor, ...)
    activation: str | None = None  # swiglu, gelu, ...
    transformer_block_type: str | None = None  # pre_ln, post_ln, ...
    has_bias: bool | None = None
    qkv_linear: bool | None = None
    fuse_qkv: bool | None = None
    fuse_gate_up: bool | None = None
    moe: MoeSection | None = None

    pipeline_cuts: list[str] | None = None  # the last layer of each stage but the final one (NxD semantics)
    use_cpu_initialization: bool = False
    weight_init_only: bool = False  # load only weights from resume_from_checkpoint, not optimizer state
    activations_checkpoint_granularity: Literal["selective", "full"] | None = None
    activations_checkpoint_recompute: list[str] | None = None  # module class names, for "selective"
    do_layer_norm_weight_decay: bool = False
    transpose_nki_inputs: bool | None = backend_only("neuron")
    fusions: FusionsSection = Field(default_factory=FusionsSection)
    optim: OptimSection = Field(default_factory=OptimSection)

    def architecture_overrides(self) -> dict[str, Any]:
        """The architecture keys set explicitly to a value (None means "not set"), ``moe`` as a dict."""
        out = {k: getattr(self, k) for k in ARCHITECTURE_KEYS if k in self.model_fields_set}
        out = {k: v for k, v in out.items() if v is not None}
        if self.moe is not None:
            moe = self.moe.model_dump(exclude_unset=True, exclude_none=True)
            if moe:
                out["moe"] = moe
        return out
