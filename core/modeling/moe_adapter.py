"""HF state dicts of mixture-of-experts models: per-expert hub keys both ways, around the kit's table adapter.

nxdt keeps each MoE layer's experts stacked (``layers.i.feed_forward.experts.w1`` ``[E, ffn, hidden]``)
and its router as ``layers.i.feed_forward.router.weight``; checkpoints hold the experts one by one
(``layers.i.feed_forward.experts.<e>.w1``, nxdt.checkpoint.portable). Hub checkpoints (Mixtral's
``model.layers.i.block_sparse_moe.experts.<e>.w1.weight``) hold them one by one too; transformers 5
fuses them in memory (``mlp.experts.gate_up_proj`` ``[E, 2 ffn, hidden]``, ``mlp.experts.down_proj``),
which ``from_hf`` also reads. Everything that is not an MoE key goes through :class:`TableAdapter`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from nxdt.modeling.hf_adapter import HFKeyTable, TableAdapter

#: the kit's expert weights, in the order gate, up, down
EXPERT_WEIGHTS = ("w1", "w3", "w2")


@dataclass(frozen=True)
class HFMoEKeys:
    """A family's HF names of one MoE block's router and experts (inside ``HFKeyTable.hf_blocks.<i>``)."""

    router: str  # HF module of the router ("block_sparse_moe.gate")
    expert: str  # per-expert module template ("block_sparse_moe.experts.{e}.{w}")
    #: kit weight -> HF weight name in the template (Mixtral: w1 gate, w3 up, w2 down)
    names: Mapping[str, str] = field(default_factory=lambda: {"w1": "w1", "w3": "w3", "w2": "w2"})
    #: transformers 5's in-memory layout, read as well: stacked [gate; up] and down projections, the router
    fused_gate_up: str | None = None
    fused_down: str | None = None
    fused_router: str | None = None


class MoETableAdapter:
    """``to_hf`` / ``from_hf`` for MoE models on any subset of keys (one pipeline stage's)."""

    def __init__(self, table: HFKeyTable, moe_keys: HFMoEKeys, cfg: Any, *, family: str = "") -> None:
        self.dense = TableAdapter(table, cfg, family=family)
        self.t, self.keys, self.cfg, self.family = table, moe_keys, cfg, family or "adapter"
        blocks, hf_blocks = re.escape(table.nxdt_blocks), re.escape(table.hf_blocks)
        weights = "|".join(EXPERT_WEIGHTS)
        self._stacked = re.compile(rf"{blocks}\.(\d+)\.feed_forward\.experts\.({weights})")
        self._single = re.compile(rf"{blocks}\.(\d+)\.feed_forward\.experts\.(\d+)\.({weights})")
        self._router = re.compile(rf"{blocks}\.(\d+)\.feed_forward\.router\.weight")
        hf_names = {hf: ours for ours, hf in moe_keys.names.items()}
        self._hf_names = hf_names
        template = re.escape(moe_keys.expert).replace(r"\{e\}", r"(\d+)").replace(r"\{w\}", f"({'|'.join(map(re.escape, hf_names))})")
        self._hf_expert = re.compile(rf"{hf_blocks}\.(\d+)\.{template}\.weight")
        routers = [moe_keys.router + ".weight"] + ([moe_keys.fused_router] if moe_keys.fused_router else [])
        self._hf_router = re.compile(rf"{hf_blocks}\.(\d+)\.({'|'.join(map(re.escape, routers))})")
        fused = [k for k in (moe_keys.fused_gate_up, moe_keys.fused_down) if k]
        self._hf_fused = re.compile(rf"{hf_blocks}\.(\d+)\.({'|'.join(map(re.escape, fused))})") if fused else None

    def _hf(self, layer: str, module: str) -> str:
        return f"{self.t.hf_blocks}.{layer}.{module}"

    def _hf_expert_key(self, layer: str, expert: int, weight: str) -> str:
        return self._hf(layer, self.keys.expert.format(e=expert, w=self.keys.names[weight])) + ".weight"

    # -- nxdt -> HF ----------------------------------------------------------------------------
    def to_hf(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """nxdt -> HF: stacked or per-expert expert weights become one HF tensor per expert."""
        out: dict[str, torch.Tensor] = {}
        rest: dict[str, torch.Tensor] = {}
        for key, tensor in state_dict.items():
            if m := self._stacked.fullmatch(key):
                layer, weight = m.groups()
                for e in range(tensor.shape[0]):
                    out[self._hf_expert_key(layer, e, weight)] = tensor[e].clone()
            elif m := self._single.fullmatch(key):
                layer, expert, weight = m.groups()
                out[self._hf_expert_key(layer, int(expert), weight)] = tensor
            elif m := self._router.fullmatch(key):
                out[self._hf(m.group(1), self.keys.router) + ".weight"] = tensor
            else:
                rest[key] = tensor
        out.update(self.dense.to_hf(rest))
        return out

    # -- HF -> nxdt ----------------------------------------------------------------------------
    def from_hf(self, hf_state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """HF -> nxdt: per-expert hub tensors (or transformers 5's fused ones) stacked per layer."""
        experts: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
        out: dict[str, torch.Tensor] = {}
        rest: dict[str, torch.Tensor] = {}
        prefix = self.t.nxdt_blocks
        for key, tensor in hf_state_dict.items():
            if m := self._hf_expert.fullmatch(key):
                layer, e, hf_weight = m.groups()
                experts.setdefault((layer, self._hf_names[hf_weight]), {})[int(e)] = tensor
            elif m := self._hf_router.fullmatch(key):
                out[f"{prefix}.{m.group(1)}.feed_forward.router.weight"] = tensor
            elif self._hf_fused is not None and (m := self._hf_fused.fullmatch(key)):
                layer, module = m.groups()
                base = f"{prefix}.{layer}.feed_forward.experts"
                if module == self.keys.fused_gate_up:
                    gate, up = tensor.chunk(2, dim=1)
                    out[f"{base}.w1"], out[f"{base}.w3"] = gate.contiguous(), up.contiguous()
                else:
                    out[f"{base}.w2"] = tensor
            else:
                rest[key] = tensor
        for (layer, weight), by_expert in experts.items():
            n = max(by_expert) + 1
            missing = sorted(set(range(n)) - set(by_expert))
            if missing:
                raise KeyError(f"{self.family} adapter: layer {layer} {weight} lacks experts {missing}")
            out[f"{prefix}.{layer}.feed_forward.experts.{weight}"] = torch.stack([by_expert[e] for e in range(n)])
        out.update(self.dense.from_hf(rest))
        return out
