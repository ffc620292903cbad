"""Where each parameter lives: its local size on every pipeline rank of a layout, from one meta build.

A :class:`ModelSnapshot` records every parameter of a meta-device build (names, owning module,
shape, ties, trainability, expert and adapter roles) once; :func:`place` then sizes each one for a
layout the way ``nxdt.parallel.apply`` splits it: the pipeline split (``split_blocks``, embeddings
on the first stage and the head on the last, a tied pair on both), KV-head replication, the
shard-plan style in force (a plugin's ``nxdt_shard_plan`` override included) and expert
parallelism. Sizes are exact, including DTensor's uneven chunks (the largest rank is taken).
"""

from __future__ import annotations

import fnmatch
import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

#: styles that split a parameter on a dimension: style -> {parameter attribute: dimension}
_SPLIT = {
    "colwise": {"weight": 0, "bias": 0, "lora_B": 0},
    "rowwise": {"weight": 1, "lora_A": 1},
    "embedding": {"weight": 0},
    "lm_head": {"weight": 0, "bias": 0},
}


@dataclass(frozen=True)
class ParamEntry:
    """One parameter of the single-device model (a tied parameter once, with all its names)."""

    names: tuple[str, ...]
    shape: tuple[int, ...]
    trainable: bool
    #: expert weights: the dimension tensor parallelism splits (dim 0, the expert, is EP's); else None
    expert_tp_dim: int | None = None
    numel: int = 0  # elements of the whole parameter


@dataclass
class ModelSnapshot:
    """A meta-device model reduced to what placement needs; built once, placed for many layouts."""

    params: list[ParamEntry]
    buffers: list[tuple[str, int]]  # (name, bytes)
    blocks: list[str]
    container: str | None
    first_only: list[str]
    last_only: list[str]
    modules: list[str]
    full_bytes: int  # every parameter at the dtype the family builds it in (what materialising allocates)
    _cache: dict[Any, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, model: nn.Module, blocks: Sequence[str]) -> ModelSnapshot:
        """Snapshot of ``model`` (on the meta device) whose repeated blocks are ``blocks``."""
        groups: dict[int, list[str]] = {}
        tensors: dict[int, Any] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            groups.setdefault(id(p), []).append(name)
            tensors[id(p)] = p
        experts: dict[str, int] = {}
        for mname, module in model.named_modules():
            for attr, dim in getattr(module, "nxdt_expert_params", {}).items():
                experts[f"{mname}.{attr}" if mname else attr] = int(dim)
        params = [
            ParamEntry(tuple(names), tuple(tensors[key].shape), bool(tensors[key].requires_grad),
                       next((experts[n] for n in names if n in experts), None), tensors[key].numel())
            for key, names in groups.items()
        ]
        buffers = [(n, b.numel() * b.element_size()) for n, b in model.named_buffers()]
        container, first, last = _top_level(model, blocks)
        modules = [n for n, _ in model.named_modules() if n]
        full_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        return cls(params, buffers, list(blocks), container, first, last, modules, full_bytes)

    @functools.cached_property
    def numel(self) -> int:
        """Parameters of the whole model (a tied matrix once)."""
        return sum(p.numel for p in self.params)

    @functools.cached_property
    def largest(self) -> int:
        """Elements of the largest parameter."""
        return max((p.numel for p in self.params), default=0)

    @property
    def buffer_bytes(self) -> int:
        """Bytes of every buffer (RoPE tables)."""
        return sum(b for _, b in self.buffers)

    def styles(self, rules: Mapping[str, str]) -> dict[str, str]:
        """Module name -> the style of the rule matching it (cached per rule set)."""
        key = ("styles", tuple(sorted(rules.items())))
        if key not in self._cache:
            out: dict[str, str] = {}
            for name in self.modules:
                for glob, style in rules.items():
                    if fnmatch.fnmatchcase(name, glob):
                        out[name] = style
                        break
            self._cache[key] = out
        return self._cache[key]  # type: ignore[no-any-return]


def _top_level(model: nn.Module, blocks: Sequence[str]) -> tuple[str | None, list[str], list[str]]:
    """(block container, top-level modules with parameters before it, those after it), as pipeline.py places them."""
    if not blocks:
        return None, [], []
    container = blocks[0].split(".")[0]
    names = [n for n, _ in model.named_children()]
    if container not in names:
        return None, [], []
    at = names.index(container)
    owned = [n for n in names if n != container and any(True for _ in getattr(model, n).parameters())]
    return container, [n for n in owned if names.index(n) < at], [n for n in owned if names.index(n) > at]


@dataclass(frozen=True)
class RankParams:
    """The parameters one pipeline rank holds (every TP/DP rank of that stage holds as many)."""

    pp_rank: int
    stages: tuple[int, ...]
    layers: tuple[int, ...]  # layers (block indices) of each local stage
    numel: int  # local elements of every parameter held
    trainable: int  # of which trainable
    expert: int  # of which trainable expert weights (ZeRO-1 shards them over edp, not dp)
    largest: int  # the largest local parameter (cast and copy transients)
    buffer_bytes: int
    first: bool  # holds the first stage (embeddings)
    last: bool  # holds the last stage (head, loss)


def _split(n: int, parts: int) -> int:
    """The largest chunk of ``n`` split ``parts`` ways (DTensor's uneven Shard)."""
    return -(-n // parts) if parts > 1 else n


def local_numel(entry: ParamEntry, name: str, style: str | None, parallel: Any, kv_replicas: int = 1,
                expert_styled: bool = False) -> int:
    """Elements of ``entry`` on the largest rank: TP split by ``style``, KV rows repeated, experts over EP and TP."""
    shape = list(entry.shape)
    attr = name.rpartition(".")[2]
    if entry.expert_tp_dim is not None and expert_styled:
        if parallel.ep > 1:
            shape[0] = _split(shape[0], parallel.ep)
        if parallel.tp > 1 and entry.expert_tp_dim < len(shape):
            shape[entry.expert_tp_dim] = _split(shape[entry.expert_tp_dim], parallel.tp)
        return math.prod(shape)
    if kv_replicas > 1 and attr != "lora_A" and shape:
        shape[0] *= kv_replicas  # the rows of each KV head repeated
    dim = _SPLIT.get(style or "", {}).get(attr) if parallel.tp > 1 else None
    if dim is not None and dim < len(shape):
        shape[dim] = _split(shape[dim], parallel.tp)
    return math.prod(shape)


@dataclass
class _Totals:
    numel: int = 0
    trainable: int = 0
    expert: int = 0
    largest: int = 0

    def add(self, other: _Totals) -> None:
        self.numel += other.numel
        self.trainable += other.trainable
        self.expert += other.expert
        self.largest = max(self.largest, other.largest)


#: places that are not a block: the first stage's modules, the last stage's, and every stage
FIRST, LAST, EVERY = "<first>", "<last>", "<every>"


def _where(name: str, snapshot: ModelSnapshot) -> str:
    """The block or end of the pipeline a tensor called ``name`` lives on."""
    top, _, rest = name.partition(".")
    if snapshot.container is None:
        return EVERY
    if top == snapshot.container:
        return f"{top}.{rest.partition('.')[0]}"
    if top in snapshot.first_only:
        return FIRST
    if top in snapshot.last_only:
        return LAST
    return EVERY  # parameterless top-level modules (RoPE tables) are on every stage


def _sized(snapshot: ModelSnapshot, parallel: Any, plan: Any, arch: Any) -> tuple[dict[frozenset[str], _Totals], dict[str, int]]:
    """Local sizes of every parameter under the layout's TP/EP split, summed by the places holding them."""
    rules = plan.as_dict(parallel.sequence_parallel) if plan is not None else {}
    key = ("sized", parallel.tp, parallel.ep, parallel.kv_replicator, tuple(sorted(rules.items())),
           tuple(plan.kv_projections) if plan is not None else ())
    if key in snapshot._cache:
        return snapshot._cache[key]  # type: ignore[no-any-return]
    styles = snapshot.styles(rules) if rules else {}
    expert_globs = [g for g, s in rules.items() if s == "expert"]
    kv_globs = tuple(plan.kv_projections) if plan is not None and parallel.tp > 1 else ()
    replicas = _kv_replicas(arch, parallel) if kv_globs else 1
    groups: dict[frozenset[str], _Totals] = {}
    for entry in snapshot.params:
        name = entry.names[0]
        module = name.rpartition(".")[0]
        kv = replicas if replicas > 1 and any(fnmatch.fnmatchcase(module, g) for g in kv_globs) else 1
        # experts are split (EP, and TP inside them) only below a module the plan styles ``expert``
        expert_styled = any(fnmatch.fnmatchcase(module, f"{g}.*") for g in expert_globs)
        n = local_numel(entry, name, styles.get(module), parallel, kv, expert_styled)
        trainable = n if entry.trainable else 0
        totals = _Totals(n, trainable, trainable if entry.expert_tp_dim is not None else 0, n)
        groups.setdefault(frozenset(_where(x, snapshot) for x in entry.names), _Totals()).add(totals)
    buffers: dict[str, int] = {}
    for name, nbytes in snapshot.buffers:
        where = _where(name, snapshot)
        buffers[where] = buffers.get(where, 0) + nbytes
    snapshot._cache[key] = (groups, buffers)
    return groups, buffers


def place(snapshot: ModelSnapshot, parallel: Any, plan: Any, arch: Any, cuts: Sequence[str] | None = None) -> list[RankParams]:
    """The parameters of each pipeline rank for ``parallel`` under shard plan ``plan`` (None: no TP/EP)."""
    n_stages = parallel.pp * parallel.vpp
    key = ("split", n_stages, tuple(cuts or ()))
    if key not in snapshot._cache:
        from nxdt.parallel.stage_split import split_blocks

        snapshot._cache[key] = split_blocks(snapshot.blocks, n_stages, cuts) if parallel.pp > 1 else [list(snapshot.blocks)]
    layout = snapshot._cache[key]
    groups, buffers = _sized(snapshot, parallel, plan, arch)
    ranks = []
    for r in range(parallel.pp):
        stage_ids = tuple(range(r, n_stages, parallel.pp)) if parallel.pp > 1 else (0,)
        first, last = 0 in stage_ids, n_stages - 1 in stage_ids
        held = {b for s in stage_ids for b in layout[s]} | {EVERY}
        held |= ({FIRST} if first else set()) | ({LAST} if last else set())
        totals = _Totals()
        for places, part in groups.items():
            if places & held:
                totals.add(part)
        buffer_bytes = sum(b for where, b in buffers.items() if where in held)
        layers = tuple(len(layout[s]) for s in stage_ids)
        ranks.append(RankParams(r, stage_ids, layers, totals.numel, totals.trainable, totals.expert, totals.largest,
                                buffer_bytes, first, last))
    return ranks


def _kv_replicas(arch: Any, parallel: Any) -> int:
    """The KV replication factor apply.py uses (1 where the config has no head counts)."""
    from nxdt.parallel.kv_replication import kv_replication_factor

    heads, kv = getattr(arch, "num_attention_heads", None), getattr(arch, "num_kv_heads", None)
    if heads is None or kv is None:
        return 1
    return kv_replication_factor(int(kv), int(heads), parallel.tp, parallel.kv_replicator)
