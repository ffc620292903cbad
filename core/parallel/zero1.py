"""ZeRO-1 and master weights: AdamW over flat, DP-sharded copies of the parameters.

Each optimizer parameter group's rank-local parameter tensors (the local shards of DTensor
parameters under TP) are laid end to end in one flat buffer, padded to a multiple of the DP size.
DP rank ``d`` owns the slice ``[d * n / dp, (d + 1) * n / dp)``: it keeps the optimizer state, and
the master copy, of that slice only. A step is: gradients averaged over DP (all-reduce, then
each rank takes its slice; NCCL would use reduce-scatter, gloo has none), AdamW on the slice
computed in fp32, then the updated slices all-gathered and copied back into the parameters.

Under expert parallelism the experts, replicated over the ``edp`` ranks only, get flat buffers of
their own, sharded over ``edp`` (each optimizer parameter group then holds two slices).

Without ``zero1`` the same class keeps fp32 master weights (``mixed_precision``) or bf16 weights
with stochastic rounding (``bf16SR``), with one DP shard holding everything.

Checkpoints: :meth:`FlatShardedAdamW.export_state` turns the flat slices into per-FQN tensors
shaped like each parameter's rank-local (TP) shard (``exp_avg``, ``exp_avg_sq``, the fp32
``master`` with master weights, ``step``), gathering the DP slices; :meth:`import_state` takes such
tensors back, copying only this rank's slice. nxdt.checkpoint.portable saves them under
single-device FQNs, so any DP/TP size or optimizer can load them. :meth:`layout` maps every FQN to
``(group, offset, numel, local shape)`` in the unsharded flat buffer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from nxdt.parallel.grad_norm import align_grad_, local_tensor
from nxdt.parallel.precision import torch_dtype, write_rounded_
from nxdt.weight_decay import ADAMW_NAMES, named_decay_groups

__all__ = ["ADAMW_NAMES", "STATE_KEYS", "FlatGroup", "FlatShardedAdamW", "decay_groups"]

#: the per-element AdamW state of each flat slice
STATE_KEYS = ("exp_avg", "exp_avg_sq")


def decay_groups(records: list[Any], weight_decay: float, decay_norms_and_biases: bool) -> list[dict[str, Any]]:
    """Named decay / no-decay groups of the trainable parameter records (local names, as checkpoints map them)."""
    named = [(r.local_name, r.param) for r in records]
    return [g for g in named_decay_groups(named, weight_decay, decay_norms_and_biases) if g["params"]]


@dataclass
class FlatGroup:
    """One optimizer group's parameters and where each lives in the flat buffer."""

    names: list[str]
    params: list[torch.Tensor]
    offsets: list[int]
    numel: int  # padded to a multiple of the DP size
    shard_start: int
    shard_numel: int
    grad_acc: torch.Tensor | None = None  # fp32 accumulation buffer (fp32_grad_acc)
    sync: str = "dp"  # the mesh dimension whose group averages (and, with ZeRO-1, shards) these parameters
    group: Any = None  # that group's process group when it shards the buffer, else None
    size: int = 1  # ranks sharing the buffer


class FlatShardedAdamW(torch.optim.Optimizer):
    """AdamW whose parameters are flat slices owned by this DP rank (ZeRO-1, master weights, SR)."""

    def __init__(
        self,
        named_groups: list[dict[str, Any]],
        *,
        lr: float,
        betas: tuple[float, float],
        eps: float,
        precision: Any,
        dp_mesh: Any = None,
        seed: int = 0,
        sync: dict[str, str] | None = None,
        sync_meshes: dict[str, Any] | None = None,
        grad_divisor: int | None = None,
    ):
        """``sync``: parameter name -> the mesh dimension that syncs it (default ``dp``); parameters of
        another dimension (experts: ``edp``) get their own flat buffers, sharded over ``sync_meshes``'
        mesh for it. ``grad_divisor`` divides the summed gradients (default: the ``dp_mesh`` size)."""
        self.dp_group = dp_mesh.get_group() if dp_mesh is not None and dp_mesh.size() > 1 else None
        self.dp = dp_mesh.size() if self.dp_group is not None else 1
        self.dp_rank = dp_mesh.get_local_rank() if self.dp_group is not None else 0
        self.grad_divisor = grad_divisor or self.dp
        meshes = {"dp": dp_mesh, **(sync_meshes or {})}
        self.precision = precision
        self.state_dtype = torch_dtype(precision.optimizer_state_dtype)
        self.seed = seed
        self.flat_groups: list[FlatGroup] = []
        self._shards: list[torch.Tensor] = []  # the optimizer's parameters, one per flat group
        torch_groups = []
        for g in named_groups:
            parts: dict[str, tuple[list[str], list[torch.Tensor]]] = {}
            for name, param in zip(g["names"], g["params"]):
                part = parts.setdefault((sync or {}).get(name, "dp"), ([], []))
                part[0].append(name)
                part[1].append(param)
            shards = []
            for key in sorted(parts, key=lambda k: k != "dp"):  # the dense buffer first
                flat = self._layout(*parts[key], meshes.get(key), key)
                master_dtype = torch.float32 if precision.master_weights else flat.params[0].dtype
                shard = torch.zeros(flat.shard_numel, dtype=master_dtype, device=flat.params[0].device)
                self._read_range([local_tensor(p.detach()) for p in flat.params], flat, flat.shard_start, shard)
                if precision.fp32_grad_acc:
                    flat.grad_acc = torch.zeros(flat.numel, dtype=torch.float32, device=shard.device)
                self.flat_groups.append(flat)
                self._shards.append(shard)
                shards.append(shard)
            torch_groups.append({"params": shards, "weight_decay": g["weight_decay"]})
        super().__init__(torch_groups, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": 0.0})
        if precision.fp32_grad_acc:
            self._install_fp32_accumulation()

    # -- layout --------------------------------------------------------------------------------
    def _layout(self, names: list[str], params: list[torch.Tensor], mesh: Any = None, sync: str = "dp") -> FlatGroup:
        group = mesh.get_group() if mesh is not None and mesh.size() > 1 else None
        size = mesh.size() if group is not None else 1
        rank = mesh.get_local_rank() if group is not None else 0
        offsets, total = [], 0
        for p in params:
            offsets.append(total)
            total += local_tensor(p).numel()
        padded = math.ceil(total / size) * size if total else size
        shard = padded // size
        return FlatGroup(list(names), list(params), offsets, padded, rank * shard, shard, sync=sync, group=group, size=size)

    @staticmethod
    def _spans(flat: FlatGroup, a: int, b: int) -> list[tuple[int, int, int]]:
        """(parameter index, start, end) of the parameters' parts inside flat range [a, b)."""
        out = []
        for i, (p, off) in enumerate(zip(flat.params, flat.offsets)):
            lo, hi = max(off, a), min(off + local_tensor(p).numel(), b)
            if lo < hi:
                out.append((i, lo, hi))
        return out

    @classmethod
    def _read_range(cls, tensors: list[torch.Tensor | None], flat: FlatGroup, a: int, out: torch.Tensor) -> None:
        """Copy the flat range [a, a + len(out)) of ``tensors`` (laid out as ``flat``) into ``out`` (padding stays)."""
        for i, lo, hi in cls._spans(flat, a, a + out.numel()):
            t = tensors[i]
            if t is not None:
                out[lo - a : hi - a] = t.reshape(-1)[lo - flat.offsets[i] : hi - flat.offsets[i]]

    @staticmethod
    def _chunk(flat: FlatGroup) -> int:
        """Elements per collective: a bounded buffer (about 256 MiB of fp32 over the group) instead of the whole flat one."""
        return max(1 << 16, (1 << 26) // max(1, flat.size))

    @staticmethod
    def _flatten(tensors: list[torch.Tensor | None], flat: FlatGroup, dtype: torch.dtype) -> torch.Tensor:
        device = flat.params[0].device if flat.params else "cpu"
        out = torch.zeros(flat.numel, dtype=dtype, device=device)
        for t, off in zip(tensors, flat.offsets):
            if t is not None:
                out[off : off + t.numel()] = t.reshape(-1)
        return out

    def layout(self) -> dict[str, tuple[int, int, int, tuple[int, ...]]]:
        """FQN -> (group index, offset in the unsharded flat buffer, numel, local shape)."""
        out = {}
        for gi, flat in enumerate(self.flat_groups):
            for name, p, off in zip(flat.names, flat.params, flat.offsets):
                local = local_tensor(p)
                out[name] = (gi, off, local.numel(), tuple(local.shape))
        return out

    # -- checkpoint state ----------------------------------------------------------------------
    @torch.no_grad()
    def export_state(self) -> dict[str, dict[str, torch.Tensor]]:
        """Per FQN: rank-local ``exp_avg``, ``exp_avg_sq``, ``master`` (with master weights) and ``step`` (a DP collective)."""
        out: dict[str, dict[str, torch.Tensor]] = {}
        for flat, shard in zip(self.flat_groups, self._shards):
            state = self.state.get(shard, {})
            buffers = {k: state[k] for k in STATE_KEYS if k in state}
            if self.precision.master_weights:
                buffers["master"] = shard
            full = {k: self._gather(v, flat) for k, v in buffers.items()}
            for name, p, off in zip(flat.names, flat.params, flat.offsets):
                local = local_tensor(p)
                entry = {k: v[off : off + local.numel()].view_as(local).clone() for k, v in full.items()}
                if "step" in state:
                    entry["step"] = torch.tensor(float(state["step"]))
                out[name] = entry
        return out

    @staticmethod
    def _gather(shard: torch.Tensor, flat: FlatGroup) -> torch.Tensor:
        if flat.group is None:
            return shard
        pieces = [torch.empty_like(shard) for _ in range(flat.size)]
        dist.all_gather(pieces, shard, group=flat.group)
        return torch.cat(pieces)

    @torch.no_grad()
    def import_state(self, states: dict[str, dict[str, torch.Tensor]]) -> None:
        """Take per-FQN rank-local tensors (as :meth:`export_state` gives) into this rank's slices.

        Without a ``master`` entry the parameters' current values are the master (so load the
        model first); without ``exp_avg`` the moments start at zero.
        """
        for flat, shard in zip(self.flat_groups, self._shards):
            lo, hi = flat.shard_start, flat.shard_start + flat.shard_numel
            state: dict[str, Any] = {}
            steps = {float(states[n]["step"]) for n in flat.names if "step" in states[n]}
            if steps:
                state["step"] = int(max(steps))
            for key in STATE_KEYS:
                if all(key in states[n] for n in flat.names):
                    state[key] = torch.zeros_like(shard, dtype=self.state_dtype)
            # An empty entry would read as "has optimizer state" to the checkpointer.
            self.state.pop(shard, None)
            if state:
                self.state[shard] = state
            for name, p, off in zip(flat.names, flat.params, flat.offsets):
                # The part of this parameter inside [lo, hi), in the flat buffer's coordinates.
                a, b = max(off, lo), min(off + local_tensor(p).numel(), hi)
                if a >= b:
                    continue
                entry = states[name]
                master = entry["master"] if self.precision.master_weights and "master" in entry else local_tensor(p)
                shard[a - lo : b - lo] = master.reshape(-1)[a - off : b - off]
                for key in STATE_KEYS:
                    if key in state:
                        state[key][a - lo : b - lo] = entry[key].reshape(-1)[a - off : b - off]

    # -- gradients -----------------------------------------------------------------------------
    def _install_fp32_accumulation(self) -> None:
        # bf16 .grad would round every micro-batch's contribution; fold each into fp32 and drop it.
        for flat in self.flat_groups:
            for p, off in zip(flat.params, flat.offsets):
                n = local_tensor(p).numel()

                def fold(param: torch.Tensor, acc=flat.grad_acc, off=off, n=n) -> None:
                    acc[off : off + n] += local_tensor(align_grad_(param)).reshape(-1).float()
                    param.grad = None

                p.register_post_accumulate_grad_hook(fold)

    def local_grads(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
        """Writable rank-local gradients of ``params`` (views into the fp32 accumulators when used)."""
        where = {id(p): (flat, off) for flat in self.flat_groups for p, off in zip(flat.params, flat.offsets)}
        out = []
        for p in params:
            flat, off = where[id(p)]
            local = local_tensor(p)
            if flat.grad_acc is not None:
                out.append(flat.grad_acc[off : off + local.numel()].view_as(local))
            elif p.grad is not None:
                out.append(local_tensor(p.grad))
        return out

    def flat_like(self, values: dict[int, float]) -> list[torch.Tensor]:
        """Per group, this rank's slice of a flat vector holding ``values[id(param)]`` per element (0 in padding)."""
        out = []
        for flat in self.flat_groups:
            full = torch.zeros(flat.numel, dtype=torch.float32, device=flat.params[0].device if flat.params else "cpu")
            for p, off in zip(flat.params, flat.offsets):
                full[off : off + local_tensor(p).numel()] = values[id(p)]
            out.append(full[flat.shard_start : flat.shard_start + flat.shard_numel].clone())  # not a view of the whole
        return out

    @torch.no_grad()
    def reduce_gradients(self) -> None:
        """Average the accumulated gradients over DP and give each shard its slice as ``.grad``."""
        for flat, shard in zip(self.flat_groups, self._shards):
            grads = [local_tensor(p.grad) if p.grad is not None else None for p in flat.params]
            lo, hi = flat.shard_start, flat.shard_start + flat.shard_numel
            if flat.group is None:
                # One holder: its slice is the whole buffer; no collective, no flat copy.
                acc = flat.grad_acc if flat.grad_acc is not None else self._flatten(grads, flat, torch.float32)
                shard.grad = acc[lo:hi].to(shard.dtype, copy=True)
                continue
            # All-reduce in bounded chunks (gloo has no reduce-scatter) and keep this rank's slice of each:
            # the optimizer never holds a second unsharded copy of the gradients.
            mine = torch.zeros(flat.shard_numel, dtype=torch.float32, device=shard.device)
            step = self._chunk(flat)
            for a in range(0, flat.numel, step):
                b = min(a + step, flat.numel)
                if flat.grad_acc is not None:
                    chunk = flat.grad_acc[a:b]
                else:
                    chunk = torch.zeros(b - a, dtype=torch.float32, device=shard.device)
                    self._read_range(grads, flat, a, chunk)
                dist.all_reduce(chunk, group=flat.group)
                x, y = max(a, lo), min(b, hi)
                if x < y:
                    mine[x - lo : y - lo] = chunk[x - a : y - a] / self.grad_divisor
            # A bf16 shard (bf16SR without master weights) takes a bf16 gradient, as torch requires.
            shard.grad = mine if shard.dtype == torch.float32 else mine.to(shard.dtype)

    def shard_grads(self) -> list[torch.Tensor]:
        """This rank's gradient slices (one per flat group)."""
        return [s.grad for s in self._shards if s.grad is not None]

    def shard_syncs(self) -> list[str]:
        """The sync dimension of each of :meth:`shard_grads`' slices."""
        return [f.sync for f, s in zip(self.flat_groups, self._shards) if s.grad is not None]

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the shards' and the model parameters' gradients and the fp32 accumulators."""
        super().zero_grad(set_to_none=set_to_none)
        for flat in self.flat_groups:
            for p in flat.params:
                p.grad = None
            if flat.grad_acc is not None:
                flat.grad_acc.zero_()

    # -- the update ----------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        """AdamW (torch's formulation) on the shards in fp32, then all-gather into the parameters."""
        first = self.param_groups[0]["params"][0]
        step = int(self.state[first]["step"]) if first in self.state else 0
        # Shard updates draw per DP rank; TP peers share a DP rank, so TP-replicated values round
        # alike. The gathered copy-back draws one stream for all ranks, keeping DP replicas equal.
        generator = self._generator(first.device, step, self.dp_rank)
        gather_generator = self._generator(first.device, step, -1)
        for group, shard in ((g, s) for g in self.param_groups for s in g["params"]):
            if shard.grad is None:
                continue
            beta1, beta2 = group["betas"]
            state = self.state[shard]
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(shard, dtype=self.state_dtype)
                state["exp_avg_sq"] = torch.zeros_like(shard, dtype=self.state_dtype)
            state["step"] += 1
            t = state["step"]
            grad = shard.grad.float()
            p = shard.float()
            p.mul_(1 - group["lr"] * group["weight_decay"])
            exp_avg = state["exp_avg"].float().lerp_(grad, 1 - beta1)
            exp_avg_sq = state["exp_avg_sq"].float().mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            denom = (exp_avg_sq.sqrt() / math.sqrt(1 - beta2**t)).add_(group["eps"])
            p.addcdiv_(exp_avg, denom, value=-group["lr"] / (1 - beta1**t))
            sr = self.precision.stochastic_rounding
            write_rounded_(shard, p, sr, generator)
            write_rounded_(state["exp_avg"], exp_avg, sr, generator)
            write_rounded_(state["exp_avg_sq"], exp_avg_sq, sr, generator)
        self._gather_into_params(gather_generator)

    def _generator(self, device: torch.device, step: int, stream: int) -> torch.Generator | None:
        if not self.precision.stochastic_rounding:
            return None
        generator = torch.Generator(device=device)
        generator.manual_seed((self.seed * 1_000_003 + step * 1009 + stream) % (2**63))
        return generator

    @torch.no_grad()
    def _gather_into_params(self, generator: torch.Generator | None) -> None:
        sr = self.precision.stochastic_rounding and self.precision.master_weights
        for flat, shard in zip(self.flat_groups, self._shards):
            slices = [local_tensor(p).view(-1) for p in flat.params]
            step = self._chunk(flat) if flat.group is not None else flat.shard_numel
            # Chunk o of every rank's slice at once: bounded buffers, never the whole flat buffer.
            for o in range(0, flat.shard_numel, max(1, step)):
                c = min(step, flat.shard_numel - o)
                piece = shard[o : o + c].float()
                if flat.group is None:
                    pieces = [piece]
                else:
                    pieces = [torch.empty_like(piece) for _ in range(flat.size)]
                    dist.all_gather(pieces, piece, group=flat.group)
                for d, got in enumerate(pieces):
                    g0 = d * flat.shard_numel + o
                    for i, lo, hi in self._spans(flat, g0, g0 + c):
                        off = flat.offsets[i]
                        # Master weights round into bf16 parameters here (stochastically for *SR modes).
                        write_rounded_(slices[i][lo - off : hi - off], got[lo - g0 : hi - g0], sr, generator)
