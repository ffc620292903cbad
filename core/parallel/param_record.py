"""The per-parameter record: one description of each parameter that every part of the engine reads.

Gradient sync (which group averages it), norms (how many ranks hold an identical copy), ZeRO-1
(which data-parallel group shards its optimizer state), portable checkpoints and export (its
canonical name, KV replication, tie partner) all look a parameter up here instead of each
re-deriving it from module names. Expert and adapter parameters add roles and sync groups.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

from torch import nn
from torch.distributed.tensor import DTensor, Shard

#: the prefix activation checkpointing wrappers insert into parameter names
WRAPPER_PREFIX = "_checkpoint_wrapped_module."
#: roles a parameter may play
ROLES = ("base", "adapter", "expert")


def clean_name(name: str) -> str:
    """A parameter name without the activation-checkpointing wrapper segments."""
    return name.replace(WRAPPER_PREFIX, "")


@dataclass
class ParamRecord:
    """One parameter of this rank."""

    name: str  # canonical single-device FQN: the key of checkpoints and exports
    local_name: str  # its FQN in this rank's module (wrappers stripped)
    param: nn.Parameter
    tp_replicas: int = 1  # tensor-parallel ranks that hold an identical copy of each local element
    kv_heads: int = 0  # for replicated KV projections: the original KV heads ...
    kv_replicas: int = 1  # ... and how often each is repeated along the rows
    sync: str = "dp"  # the mesh dimension whose group averages its gradient
    tie: str | None = None  # a twin on another pipeline stage (tied embedding / LM head), by local name
    pipeline_copies: int = 1  # pipeline ranks holding this same parameter (2 for a tied pair across stages)
    role: str = "base"

    @property
    def trainable(self) -> bool:
        """Whether the optimizer updates it."""
        return self.param.requires_grad

    @property
    def is_kv_replicated(self) -> bool:
        """Whether its rows hold repeated KV heads (saved and exported with each head once)."""
        return self.kv_replicas > 1

    @property
    def norm_weight(self) -> float:
        """1 / (copies of each local value across TP and PP): norms count every value once."""
        return 1.0 / (self.tp_replicas * self.pipeline_copies)


class ParamTable:
    """This rank's parameter records, in ``module.named_parameters()`` order."""

    def __init__(self, records: Sequence[ParamRecord]):
        self.records = list(records)
        self._by_id = {id(r.param): r for r in self.records}
        self._by_name = {r.local_name: r for r in self.records}

    def __iter__(self) -> Iterator[ParamRecord]:
        return iter(self.records)

    def __len__(self) -> int:
        return len(self.records)

    def of(self, param: nn.Parameter) -> ParamRecord:
        """The record of ``param``."""
        return self._by_id[id(param)]

    def named(self, local_name: str) -> ParamRecord:
        """The record of the parameter called ``local_name`` on this rank."""
        return self._by_name[clean_name(local_name)]

    def trainable(self) -> list[ParamRecord]:
        """Records of the parameters the optimizer updates."""
        return [r for r in self.records if r.trainable]

    def kv_replicated(self) -> list[ParamRecord]:
        """Records of replicated KV projections."""
        return [r for r in self.records if r.is_kv_replicated]


def build_param_table(
    module: nn.Module,
    tp: int,
    *,
    kv_names: Sequence[str] = (),
    kv_heads: int = 0,
    kv_replicas: int = 1,
    aliases: Mapping[str, str] | None = None,
    tied: Sequence[str] = (),
    roles: Mapping[str, str] | None = None,
    sync: Mapping[str, str] | None = None,
) -> ParamTable:
    """Records of ``module``'s parameters after tensor parallelism and pipeline pruning.

    ``kv_names``: replicated KV projections; ``aliases``: local name -> canonical name where they
    differ (a pipeline stage's tied LM head is saved under the embedding's name); ``tied``: local
    names held by two pipeline stages; ``roles`` / ``sync``: local name -> role / sync dimension.
    """
    aliases, roles, sync = dict(aliases or {}), dict(roles or {}), dict(sync or {})
    kv, twins = set(kv_names), set(tied)
    records = []
    for raw, p in module.named_parameters():
        name = clean_name(raw)
        sharded = isinstance(p, DTensor) and any(isinstance(pl, Shard) for pl in p.placements)
        is_kv = name in kv and kv_replicas > 1
        records.append(
            ParamRecord(
                name=aliases.get(name, name),
                local_name=name,
                param=p,
                tp_replicas=(kv_replicas if is_kv else 1) if sharded else tp,
                kv_heads=kv_heads if is_kv else 0,
                kv_replicas=kv_replicas if is_kv else 1,
                sync=sync.get(name, "dp"),
                tie=next((t for t in twins if t != name), None) if name in twins else None,
                pipeline_copies=2 if name in twins else 1,
                role=roles.get(name, "base"),
            )
        )
    return ParamTable(records)
