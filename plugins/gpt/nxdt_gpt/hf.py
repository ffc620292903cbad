"""HF checkpoints of the gpt family: GPT-2, and the transformers architectures other GPT shapes are.

A GPT-2 shaped model (learned positions, LayerNorm, a plain GELU/ReLU MLP, biases everywhere, one
KV head per query head) reads and writes ``GPT2LMHeadModel``: its Conv1D weights are stored
[in, out] and transposed on the way, and ``attn.c_attn`` ([q; k; v] rows) is split on import so
tensor parallelism can column-split q, k and v, and fused again on export.

A Megatron GPT switched to RoPE and SwiGLU has no GPT-2 form. It is exported as the architecture
that computes the same function: ``LlamaForCausalLM`` with RMSNorm, ``StableLmForCausalLM`` with
LayerNorm (partial rotary, q/k/v biases at most). Other shapes are refused with one line naming
what transformers lacks; nothing is written.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch

from nxdt.errors import NxdtError
from nxdt.modeling import (
    LLAMA_STYLE_CONFIG,
    LLAMA_STYLE_KEYS,
    HFConfigTable,
    HFKeyTable,
    TableAdapter,
    read_hf_config,
    write_hf_config,
)
from nxdt_gpt.config import GPTConfig

GPT2_EOT = 50256
#: kit activation -> GPT2Config.activation_function, and what GPT-2 configs may say for each
GPT2_ACTIVATIONS = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu", "silu": "silu"}
_GPT2_ACTIVATION_NAMES = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu",
                          "relu": "relu", "silu": "silu", "swish": "silu"}

GPT2_KEYS = HFKeyTable(
    top_level={
        "tok_embeddings.weight": "transformer.wte.weight",
        "pos_embeddings.weight": "transformer.wpe.weight",
        "norm.weight": "transformer.ln_f.weight",
        "norm.bias": "transformer.ln_f.bias",
        "output.weight": "lm_head.weight",
    },
    block={
        "attention_norm": "ln_1",
        "ffn_norm": "ln_2",
        "attention.wo": "attn.c_proj",
        "feed_forward.w1": "mlp.c_fc",
        "feed_forward.w2": "mlp.c_proj",
    },
    hf_blocks="transformer.h",
    hf_fused={"attn.c_attn": ("attention.wq", "attention.wk", "attention.wv")},
    transposed=("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"),
    # the causal-mask buffers older transformers saved with each block
    ignored=(r"transformer\.h\.\d+\.attn\.(bias|masked_bias)",),
)
STABLELM_KEYS = dataclasses.replace(
    LLAMA_STYLE_KEYS, top_level={**LLAMA_STYLE_KEYS.top_level, "norm.bias": "model.norm.bias"}
)

_ROPE_SWIGLU = {"activation": "swiglu", "position_embedding": "rope"}
LLAMA_FORM = HFConfigTable(
    model_type="llama", architecture="LlamaForCausalLM", fixed={"norm": "rmsnorm", **_ROPE_SWIGLU}
)
STABLELM_FORM = HFConfigTable(
    model_type="stablelm",
    architecture="StableLmForCausalLM",
    keys={
        **{k: v for k, v in LLAMA_STYLE_CONFIG.items() if k not in ("rms_norm_eps", "head_dim")},
        "layer_norm_eps": "norm_eps",
        "hidden_dropout": "hidden_dropout",
        "use_qkv_bias": "qkv_bias",
    },
    fixed={"norm": "layernorm", "attention_bias": False, "mlp_bias": False, **_ROPE_SWIGLU},
    accepts={"hidden_act": ("silu",), "qk_layernorm": (False,), "use_parallel_residual": (False,)},
    constants={"hidden_act": "silu", "qk_layernorm": False, "use_parallel_residual": False},
)
#: what each HF model type's config leaves out means (its transformers defaults where ours differ)
_HF_DEFAULTS = {
    "llama": {"attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False, "rms_norm_eps": 1e-6},
    "stablelm": {"use_qkv_bias": False, "tie_word_embeddings": False, "partial_rotary_factor": 0.25},
}


def _shape(cfg: GPTConfig) -> str:
    biases = [name for name, on in (("qkv", cfg.qkv_bias), ("out", cfg.attention_bias), ("mlp", cfg.mlp_bias)) if on]
    return (
        f"{cfg.position_embedding} positions, {cfg.norm}, {cfg.activation}, biases: {'/'.join(biases) or 'none'}, "
        f"{cfg.num_attention_heads} heads / {cfg.num_kv_heads} KV heads"
    )


def hf_form(cfg: GPTConfig) -> str | None:
    """``gpt2``, ``llama`` or ``stablelm``: the transformers model that computes ``cfg``'s function; None if none does."""
    assert cfg.head_dim is not None
    plain_heads = cfg.head_dim * cfg.num_attention_heads == cfg.hidden_size
    if cfg.post_norm or not cfg.causal:
        return None
    if cfg.position_embedding == "learned_absolute":
        all_biases = bool(cfg.qkv_bias and cfg.attention_bias and cfg.mlp_bias)
        mha = cfg.num_kv_heads == cfg.num_attention_heads
        if cfg.norm == "layernorm" and cfg.activation in GPT2_ACTIVATIONS and all_biases and mha and plain_heads:
            return "gpt2"
        return None
    if cfg.activation != "swiglu" or cfg.sliding_window is not None:
        return None
    if cfg.norm == "rmsnorm" and cfg.rotary_percentage == 1.0 and cfg.qkv_bias == cfg.attention_bias:
        return "llama"
    if cfg.norm == "layernorm" and not (cfg.attention_bias or cfg.mlp_bias) and plain_heads and not cfg.rope_scaling:
        return "stablelm"
    return None


def require_hf_form(cfg: GPTConfig) -> str:
    """:func:`hf_form`, or a one-line NxdtError saying why this shape has no transformers architecture."""
    form = hf_form(cfg)
    if form is None:
        raise NxdtError(
            f"this gpt model ({_shape(cfg)}) has no transformers architecture: GPT-2 needs learned positions, "
            "layernorm, a gelu/relu MLP, every bias and one KV head per head; Llama rmsnorm, full rope and swiglu; "
            "StableLM layernorm, rope, swiglu and no output/MLP biases"
        )
    return form


# -- config.json -----------------------------------------------------------------------------
def config_to_hf(cfg: GPTConfig) -> dict[str, Any]:
    """The config.json of the transformers architecture ``cfg`` is (NxdtError if there is none)."""
    form = require_hf_form(cfg)
    if form == "llama":
        return write_hf_config(LLAMA_FORM, cfg)
    if form == "stablelm":
        out = write_hf_config(STABLELM_FORM, cfg)
        # transformers 5 reads the rotary share inside rope_parameters, 4.x at the top level
        out["partial_rotary_factor"] = cfg.rotary_percentage
        out["rope_parameters"]["partial_rotary_factor"] = cfg.rotary_percentage
        return out
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size,
        "n_embd": cfg.hidden_size,
        "n_layer": cfg.num_layers,
        "n_head": cfg.num_attention_heads,
        "n_inner": cfg.ffn_hidden_size,
        "n_positions": cfg.max_position_embeddings,
        "layer_norm_epsilon": cfg.norm_eps,
        "activation_function": GPT2_ACTIVATIONS[cfg.activation],
        "initializer_range": cfg.init_std,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "resid_pdrop": cfg.hidden_dropout,
        "embd_pdrop": cfg.hidden_dropout,
        "attn_pdrop": cfg.attention_dropout,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        # GPT-2's <|endoftext|>, where the vocabulary is GPT-2's (padded or not); else unknown here
        "bos_token_id": GPT2_EOT if cfg.vocab_size > GPT2_EOT else None,
        "eos_token_id": GPT2_EOT if cfg.vocab_size > GPT2_EOT else None,
    }


def config_from_hf(hf: Mapping[str, Any]) -> GPTConfig:
    """GPTConfig from a GPT-2 config.json (or the StableLM / Llama ones :func:`config_to_hf` writes)."""
    model_type = hf.get("model_type", "gpt2")
    if model_type in _HF_DEFAULTS:
        hf = {**_HF_DEFAULTS[model_type], **hf}
    if model_type == "llama":
        return read_hf_config(LLAMA_FORM, hf, GPTConfig)
    if model_type == "stablelm":
        cfg = read_hf_config(STABLELM_FORM, hf, GPTConfig)
        rotary = (hf.get("rope_parameters") or {}).get("partial_rotary_factor", hf["partial_rotary_factor"])
        return dataclasses.replace(cfg, rotary_percentage=float(rotary))
    if model_type != "gpt2":
        raise ValueError(f"the gpt family reads HF model types gpt2 and stablelm, not {model_type!r}")
    return _read_gpt2(hf)


def _read_gpt2(hf: Mapping[str, Any]) -> GPTConfig:
    for key, honoured in (("add_cross_attention", False), ("scale_attn_by_inverse_layer_idx", False),
                          ("scale_attn_weights", True)):
        if key in hf and bool(hf[key]) != honoured:
            raise ValueError(f"gpt2: {key}={hf[key]!r} is not supported (only {honoured})")
    activation = hf.get("activation_function", "gelu_new")
    if activation not in _GPT2_ACTIVATION_NAMES:
        raise ValueError(f"gpt2: activation_function {activation!r} is not one of {', '.join(_GPT2_ACTIVATION_NAMES)}")
    resid, embd = hf.get("resid_pdrop", 0.1), hf.get("embd_pdrop", hf.get("resid_pdrop", 0.1))
    if resid != embd:
        raise ValueError(f"gpt2: embd_pdrop {embd} differs from resid_pdrop {resid}; nxdt's hidden_dropout is one value")
    return GPTConfig(
        vocab_size=hf.get("vocab_size", 50257),
        hidden_size=hf.get("n_embd", 768),
        num_layers=hf.get("n_layer", 12),
        num_attention_heads=hf.get("n_head", 12),
        ffn_hidden_size=hf.get("n_inner") or 0,  # None: 4 x n_embd
        max_position_embeddings=hf.get("n_positions", 1024),
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        init_std=hf.get("initializer_range", 0.02),
        tie_word_embeddings=hf.get("tie_word_embeddings", True),
        activation=_GPT2_ACTIVATION_NAMES[activation],
        hidden_dropout=resid,
        attention_dropout=hf.get("attn_pdrop", 0.1),
    )


# -- weights ---------------------------------------------------------------------------------
class GPT2Adapter(TableAdapter):
    """The GPT-2 table adapter; also reads checkpoints saved from the bare ``GPT2Model`` (no ``transformer.``)."""

    def from_hf(self, hf_state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """HF -> nxdt, with the original OpenAI checkpoints' unprefixed names (``h.0.attn.c_attn.weight``) accepted."""
        named = {k if k.startswith(("transformer.", "lm_head.")) else f"transformer.{k}": v for k, v in hf_state_dict.items()}
        return super().from_hf(named)


class NoHFForm:
    """The adapter of a shape transformers has no architecture for: every conversion is a one-line error."""

    def __init__(self, cfg: GPTConfig) -> None:
        self.cfg = cfg

    def to_hf(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Refuse (NxdtError)."""
        require_hf_form(self.cfg)
        raise AssertionError("unreachable")

    def from_hf(self, hf_state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Refuse (NxdtError)."""
        return self.to_hf(hf_state_dict)


def state_dict_adapter(cfg: GPTConfig) -> Any:
    """The HF weight adapter of ``cfg``'s transformers form."""
    form = hf_form(cfg)
    if form == "gpt2":
        return GPT2Adapter(GPT2_KEYS, cfg, family="gpt")
    if form == "llama":
        return TableAdapter(LLAMA_STYLE_KEYS, cfg, family="gpt")
    if form == "stablelm":
        return TableAdapter(STABLELM_KEYS, cfg, family="gpt")
    return NoHFForm(cfg)
