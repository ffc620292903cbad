"""Hugging Face interop: LlamaForCausalLM/MistralForCausalLM state dicts and config.json dicts.

Both sides use the rotate_half RoPE layout, so weights only change names, except that fused
``wqkv``/``w13`` are concatenations of HF's q/k/v and gate/up projections (rows in that order).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

import torch

from nxdt_llama.model import LlamaConfig

HF_MODEL_TYPES = ("llama", "mistral")
HF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}

_TOP_LEVEL = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# Module paths inside one block: nxdt -> HF.
_BLOCK = {
    "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attention.wq": "self_attn.q_proj",
    "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w3": "mlp.up_proj",
    "feed_forward.w2": "mlp.down_proj",
}
_BLOCK_FROM_HF = {hf: ours for ours, hf in _BLOCK.items()}
_FUSED = {
    "attention.wqkv": ("attention.wq", "attention.wk", "attention.wv"),
    "feed_forward.w13": ("feed_forward.w1", "feed_forward.w3"),
}
_OURS_RE = re.compile(r"layers\.(\d+)\.(.+)\.(weight|bias)")
_HF_RE = re.compile(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)")
# Buffers older HF checkpoints saved; they are recomputed, never loaded.
_HF_IGNORED_RE = re.compile(r".*rotary_emb\.inv_freq")


class LlamaStateDictAdapter:
    """Converts nxdt Llama state dicts to HF ``LlamaForCausalLM`` ones and back (any subset of layers)."""

    def __init__(self, cfg: LlamaConfig) -> None:
        self.cfg = cfg
        self._fused = {"attention.wqkv": cfg.fuse_qkv, "feed_forward.w13": cfg.fuse_gate_up}
        q_dim, kv_dim = cfg.num_attention_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self._split_sizes = {
            "attention.wqkv": [q_dim, kv_dim, kv_dim],
            "feed_forward.w13": [cfg.ffn_hidden_size] * 2,
        }

    def to_hf(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """nxdt -> HF names; splits fused weights; writes no ``lm_head.weight`` when tied (as HF saves it)."""
        out: dict[str, torch.Tensor] = {}
        for key, tensor in state_dict.items():
            if key in _TOP_LEVEL:
                # HF saves a tied matrix once, as the embedding; a last pipeline stage has only the output.
                if (
                    key == "output.weight"
                    and self.cfg.tie_word_embeddings
                    and "tok_embeddings.weight" in state_dict
                ):
                    continue
                out[_TOP_LEVEL[key]] = tensor
                continue
            match = _OURS_RE.fullmatch(key)
            if match is None:
                raise KeyError(f"llama adapter: unexpected nxdt key {key!r}")
            layer, module, param = match.groups()
            if module in _FUSED:
                # clone: split views share storage, which safetensors refuses to save
                parts = tensor.split(self._split_sizes[module], dim=0)
                for part_module, part in zip(_FUSED[module], parts, strict=True):
                    out[f"model.layers.{layer}.{_BLOCK[part_module]}.{param}"] = part.clone()
            elif module in _BLOCK:
                out[f"model.layers.{layer}.{_BLOCK[module]}.{param}"] = tensor
            else:
                raise KeyError(f"llama adapter: unexpected nxdt key {key!r}")
        return out

    def from_hf(self, hf_state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """HF -> nxdt names; fuses q/k/v and gate/up when configured; fills the tied output weight."""
        top_level_from_hf = {hf: ours for ours, hf in _TOP_LEVEL.items()}
        out: dict[str, torch.Tensor] = {}
        for key, tensor in hf_state_dict.items():
            if _HF_IGNORED_RE.fullmatch(key):
                continue
            if key in top_level_from_hf:
                out[top_level_from_hf[key]] = tensor
                continue
            match = _HF_RE.fullmatch(key)
            if match is None or match.group(2) not in _BLOCK_FROM_HF:
                raise KeyError(f"llama adapter: unexpected HF key {key!r}")
            layer, module, param = match.groups()
            out[f"layers.{layer}.{_BLOCK_FROM_HF[module]}.{param}"] = tensor
        if self.cfg.tie_word_embeddings and "tok_embeddings.weight" in out:
            # HF state dicts may repeat the shared matrix as lm_head.weight; the embedding is the source.
            out["output.weight"] = out["tok_embeddings.weight"]
        return self._fuse(out)

    def _fuse(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        for fused, parts in _FUSED.items():
            if not self._fused[fused]:
                continue
            matches = (_OURS_RE.fullmatch(key) for key in list(state_dict))
            groups = dict.fromkeys((m.group(1), m.group(3)) for m in matches if m and m.group(2) in parts)
            for layer, param in groups:
                names = [f"layers.{layer}.{part}.{param}" for part in parts]
                missing = [name for name in names if name not in state_dict]
                if missing:
                    raise KeyError(
                        f"llama adapter: cannot build fused layers.{layer}.{fused}.{param}: missing {missing}"
                    )
                state_dict[f"layers.{layer}.{fused}.{param}"] = torch.cat(
                    [state_dict.pop(n) for n in names], dim=0
                )
        return state_dict


def state_dict_adapter(cfg: LlamaConfig) -> LlamaStateDictAdapter:
    """The HF state-dict adapter for ``cfg``."""
    return LlamaStateDictAdapter(cfg)


def config_from_nxdt(model_section: Mapping[str, Any], base: LlamaConfig | None = None) -> LlamaConfig:
    """LlamaConfig from NxDT ``model`` keys; absent keys keep ``base`` (e.g. from config.json) or the defaults."""
    keys = {
        "vocab_size": "vocab_size",
        "hidden_size": "hidden_size",
        "num_layers": "num_layers",
        "num_attention_heads": "num_attention_heads",
        "num_kv_heads": "num_kv_heads",
        "ffn_hidden_size": "ffn_hidden_size",
        "max_position_embeddings": "max_position_embeddings",
        "rope_theta": "rope_theta",
        "rope_scaling": "rope_scaling",
        "layernorm_epsilon": "norm_eps",
        "share_embeddings_and_output_weights": "tie_word_embeddings",
        "fuse_qkv": "fuse_qkv",
        "fuse_gate_up": "fuse_gate_up",
        "init_method_std": "init_std",
    }
    kwargs = {ours: model_section[nxdt] for nxdt, ours in keys.items() if model_section.get(nxdt) is not None}
    if isinstance(kwargs.get("rope_scaling"), Mapping):
        kwargs["rope_scaling"] = dict(kwargs["rope_scaling"])
    if base is not None:
        if {"hidden_size", "num_attention_heads"} & kwargs.keys():
            kwargs["head_dim"] = None  # re-derived from the new shape
        return dataclasses.replace(base, **kwargs)
    return LlamaConfig(**kwargs)


def config_from_hf(hf_config: Mapping[str, Any]) -> LlamaConfig:
    """LlamaConfig from an HF llama/mistral ``config.json`` dict (transformers 4.x or 5.x rope keys)."""
    model_type = hf_config.get("model_type", "llama")
    if model_type not in HF_MODEL_TYPES:
        raise ValueError(f"llama: cannot read HF model_type {model_type!r}; expected one of {HF_MODEL_TYPES}")
    if hf_config.get("hidden_act", "silu") != "silu":
        raise ValueError(f"llama: hidden_act {hf_config['hidden_act']!r} is not supported (only 'silu')")
    window = hf_config.get("sliding_window")
    max_pos = hf_config.get("max_position_embeddings", LlamaConfig.max_position_embeddings)
    if window is not None and window < max_pos:
        raise ValueError(
            f"llama: sliding_window={window} < max_position_embeddings={max_pos} is not supported "
            "(attention is full causal); models such as Mistral-7B-v0.3 have sliding_window null"
        )
    # transformers 5 nests theta inside `rope_parameters`; 4.x had top-level rope_theta + rope_scaling.
    rope = dict(hf_config.get("rope_parameters") or hf_config.get("rope_scaling") or {})
    rope_theta = rope.pop("rope_theta", hf_config.get("rope_theta", LlamaConfig.rope_theta))
    keys = {
        "vocab_size": "vocab_size",
        "hidden_size": "hidden_size",
        "num_hidden_layers": "num_layers",
        "num_attention_heads": "num_attention_heads",
        "num_key_value_heads": "num_kv_heads",
        "intermediate_size": "ffn_hidden_size",
        "max_position_embeddings": "max_position_embeddings",
        "rms_norm_eps": "norm_eps",
        "tie_word_embeddings": "tie_word_embeddings",
        "initializer_range": "init_std",
        "attention_bias": "attention_bias",
        "mlp_bias": "mlp_bias",
        "head_dim": "head_dim",
    }
    kwargs = {ours: hf_config[hf] for hf, ours in keys.items() if hf_config.get(hf) is not None}
    return LlamaConfig(rope_theta=float(rope_theta), rope_scaling=rope or None, **kwargs)


def config_to_hf(cfg: LlamaConfig) -> dict[str, Any]:
    """An HF ``LlamaForCausalLM`` config.json dict, readable by transformers 4.x and 5.x alike."""
    rope_scaling = dict(cfg.rope_scaling) if cfg.rope_scaling else None
    return {
        "architectures": [HF_ARCHITECTURES["llama"]],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.ffn_hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "initializer_range": cfg.init_std,
        "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "attention_bias": cfg.attention_bias,
        "mlp_bias": cfg.mlp_bias,
        # 5.x reads rope_parameters; 4.x reads rope_theta and rope_scaling (5.x derives the same from them).
        "rope_parameters": {"rope_type": "default", **(rope_scaling or {}), "rope_theta": cfg.rope_theta},
        "rope_theta": cfg.rope_theta,
        "rope_scaling": rope_scaling,
    }
