"""A table-driven Hugging Face state-dict adapter: a family declares key tables, not conversion code.

Conversion goes through *canonical* nxdt tensors, one per unfused module (``attention.wq``, ...):

    HF state dict  <->  canonical tensors  <->  the model's state dict
       key tables, HF-side fusions            the model's own fusions (``wqkv``, ``w13``)
       (GPT-2 ``c_attn``), transposed         enabled by the config
       Conv1D weights, ignored buffers

Row sizes for splitting a fused matrix come from ``row_sizes(cfg)`` (module -> output rows), so a
fused tensor is split exactly, whatever the shapes of GQA, biases or head_dim.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class HFKeyTable:
    """How one family's module names map onto HF's."""

    #: top-level nxdt FQN -> HF key (``tok_embeddings.weight`` -> ``model.embed_tokens.weight``)
    top_level: Mapping[str, str]
    #: module path inside block i, nxdt -> HF (``attention.wq`` -> ``self_attn.q_proj``); params follow
    block: Mapping[str, str]
    nxdt_blocks: str = "layers"
    hf_blocks: str = "model.layers"
    #: HF module -> the canonical nxdt modules its rows concatenate (GPT-2's ``attn.c_attn``)
    hf_fused: Mapping[str, Sequence[str]] = field(default_factory=dict)
    #: HF modules whose weights are stored [in, out] (GPT-2's Conv1D), transposed on the way
    transposed: Sequence[str] = ()
    #: regexes of HF keys that are recomputed and never loaded (rotary inv_freq, causal-mask buffers)
    ignored: Sequence[str] = ()
    #: nxdt FQN of a tied output -> the FQN it shares storage with
    tied: Mapping[str, str] = field(default_factory=lambda: {"output.weight": "tok_embeddings.weight"})


#: The Llama/Mistral/Qwen2 naming shared by most HF decoders.
LLAMA_STYLE_KEYS = HFKeyTable(
    top_level={
        "tok_embeddings.weight": "model.embed_tokens.weight",
        "norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight",
    },
    block={
        "attention_norm": "input_layernorm",
        "ffn_norm": "post_attention_layernorm",
        "attention.wq": "self_attn.q_proj",
        "attention.wk": "self_attn.k_proj",
        "attention.wv": "self_attn.v_proj",
        "attention.wo": "self_attn.o_proj",
        "feed_forward.w1": "mlp.gate_proj",
        "feed_forward.w3": "mlp.up_proj",
        "feed_forward.w2": "mlp.down_proj",
    },
    ignored=(r".*rotary_emb\.inv_freq",),
)

#: The model's own fused modules (enabled by config flags) -> their canonical parts, in row order.
KIT_FUSIONS = {
    "attention.wqkv": ("attention.wq", "attention.wk", "attention.wv"),
    "feed_forward.w13": ("feed_forward.w1", "feed_forward.w3"),
}


def kit_row_sizes(cfg: Any) -> dict[str, int]:
    """Output rows of each canonical kit module that may be part of a fusion."""
    return {
        "attention.wq": cfg.q_dim,
        "attention.wk": cfg.kv_dim,
        "attention.wv": cfg.kv_dim,
        "feed_forward.w1": cfg.ffn_hidden_size,
        "feed_forward.w3": cfg.ffn_hidden_size,
    }


def kit_fusions_on(cfg: Any) -> dict[str, bool]:
    """Which of :data:`KIT_FUSIONS` ``cfg`` enables."""
    return {"attention.wqkv": bool(cfg.fuse_qkv), "feed_forward.w13": bool(cfg.fuse_gate_up)}


class TableAdapter:
    """``to_hf`` / ``from_hf`` for any subset of a model's keys (one pipeline stage's, say)."""

    def __init__(
        self,
        table: HFKeyTable,
        cfg: Any,
        *,
        row_sizes: Callable[[Any], Mapping[str, int]] = kit_row_sizes,
        fusions: Mapping[str, Sequence[str]] = KIT_FUSIONS,
        fusions_on: Callable[[Any], Mapping[str, bool]] = kit_fusions_on,
        family: str = "",
    ) -> None:
        self.t, self.cfg, self.family = table, cfg, family or "adapter"
        self.rows = dict(row_sizes(cfg))
        on = fusions_on(cfg)
        self.fusions = {k: tuple(v) for k, v in fusions.items() if on.get(k)}
        self.tied = dict(table.tied) if getattr(cfg, "tie_word_embeddings", False) else {}
        self.block_from_hf = {hf: ours for ours, hf in table.block.items()}
        self.top_from_hf = {hf: ours for ours, hf in table.top_level.items()}
        self._ours = re.compile(rf"{re.escape(table.nxdt_blocks)}\.(\d+)\.(.+)\.(weight|bias)")
        self._hf = re.compile(rf"{re.escape(table.hf_blocks)}\.(\d+)\.(.+)\.(weight|bias)")
        self._ignored = [re.compile(p) for p in table.ignored]

    # -- nxdt -> HF ----------------------------------------------------------------------------
    def to_hf(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """nxdt -> HF names and layouts; a tied output is written once, as HF saves it (as the embedding)."""
        out: dict[str, torch.Tensor] = {}
        pending: dict[tuple[str, str, str], torch.Tensor] = {}  # (layer, canonical module, param) -> tensor
        for key, tensor in state_dict.items():
            if key in self.t.top_level:
                if key in self.tied and self.tied[key] in state_dict:
                    continue
                out[self.t.top_level[key]] = tensor
                continue
            match = self._ours.fullmatch(key)
            if match is None:
                raise KeyError(f"{self.family} adapter: unexpected nxdt key {key!r}")
            layer, module, param = match.groups()
            for part, piece in self._split(module, tensor):
                pending[(layer, part, param)] = piece
        hf_parts = {part: hf for hf, parts in self.t.hf_fused.items() for part in parts}
        for (layer, module, param), tensor in list(pending.items()):
            if module in hf_parts:
                continue
            if module not in self.t.block:
                raise KeyError(f"{self.family} adapter: unexpected nxdt key {self.t.nxdt_blocks}.{layer}.{module}.{param}")
            out[self._hf_key(layer, self.t.block[module], param)] = self._out(self.t.block[module], tensor, param)
        for hf_module, parts in self.t.hf_fused.items():
            for layer, param in sorted({(lay, prm) for (lay, mod, prm) in pending if mod in parts}):
                pieces = [pending.get((layer, part, param)) for part in parts]
                if any(p is None for p in pieces):
                    raise KeyError(f"{self.family} adapter: {hf_module} of layer {layer} needs all of {list(parts)}")
                fused = torch.cat(pieces, dim=0)  # type: ignore[arg-type]
                out[self._hf_key(layer, hf_module, param)] = self._out(hf_module, fused, param)
        return out

    def _split(self, module: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        if module not in self.fusions:
            return [(module, tensor)]
        parts = self.fusions[module]
        # clone: split views share storage, which safetensors refuses to save
        return [(p, t.clone()) for p, t in zip(parts, tensor.split([self.rows[p] for p in parts], dim=0), strict=True)]

    def _hf_key(self, layer: str, module: str, param: str) -> str:
        return f"{self.t.hf_blocks}.{layer}.{module}.{param}"

    def _out(self, hf_module: str, tensor: torch.Tensor, param: str) -> torch.Tensor:
        if hf_module in self.t.transposed and param == "weight":
            return tensor.t().contiguous()
        return tensor

    # -- HF -> nxdt ----------------------------------------------------------------------------
    def from_hf(self, hf_state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """HF -> nxdt names and layouts; fuses where the config asks; fills a tied output from the embedding."""
        out: dict[str, torch.Tensor] = {}
        for key, tensor in hf_state_dict.items():
            if any(p.fullmatch(key) for p in self._ignored):
                continue
            if key in self.top_from_hf:
                out[self.top_from_hf[key]] = tensor
                continue
            match = self._hf.fullmatch(key)
            if match is None:
                raise KeyError(f"{self.family} adapter: unexpected HF key {key!r}")
            layer, module, param = match.groups()
            if module in self.t.transposed and param == "weight":
                tensor = tensor.t().contiguous()
            if module in self.t.hf_fused:
                parts = self.t.hf_fused[module]
                sizes = [self.rows[p] for p in parts]
                for part, piece in zip(parts, tensor.split(sizes, dim=0), strict=True):
                    out[f"{self.t.nxdt_blocks}.{layer}.{part}.{param}"] = piece.contiguous()
            elif module in self.block_from_hf:
                out[f"{self.t.nxdt_blocks}.{layer}.{self.block_from_hf[module]}.{param}"] = tensor
            else:
                raise KeyError(f"{self.family} adapter: unexpected HF key {key!r}")
        for tied, source in self.tied.items():
            if source in out:
                # HF state dicts may repeat the shared matrix; the embedding is the source.
                out[tied] = out[source]
        return self._fuse(out)

    def _fuse(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        for fused, parts in self.fusions.items():
            matches = (self._ours.fullmatch(key) for key in list(state_dict))
            groups = dict.fromkeys((m.group(1), m.group(3)) for m in matches if m and m.group(2) in parts)
            for layer, param in groups:
                names = [f"{self.t.nxdt_blocks}.{layer}.{part}.{param}" for part in parts]
                missing = [name for name in names if name not in state_dict]
                if missing:
                    raise KeyError(f"{self.family} adapter: cannot build fused layer {layer} {fused}.{param}: missing {missing}")
                state_dict[f"{self.t.nxdt_blocks}.{layer}.{fused}.{param}"] = torch.cat(
                    [state_dict.pop(n) for n in names], dim=0
                )
        return state_dict
