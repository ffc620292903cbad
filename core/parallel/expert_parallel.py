"""Expert parallelism: experts split over the ``ep`` mesh dimension, token copies moved by all-to-all.

The ``ep`` dimension is carved out of data parallelism (world.py: DP = edp x ep), as in NxD and
Megatron: the ``ep`` ranks of a group hold different data *and* different experts. A module the
shard plan styles ``expert`` (the kit's ``MoE``) gets:

- its experts' weights (``experts.nxdt_expert_params``: name -> tensor-parallel dimension; dim 0
  is the expert) as DTensors on the ("ep", "tp") sub-mesh: ``Shard(0)`` over EP (rank r holds
  experts ``[r E/ep, (r+1) E/ep)``), ``Shard(d)`` over TP (each expert's hidden channels, as
  NxD allows TP inside an EP rank);
- a :class:`ExpertParallelComm` as its ``comm``: under SP it all-gathers the sequence on entry
  and keeps this rank's slice on exit; it exchanges per-expert counts, then token copies, with
  ``all_to_all_single`` (variable splits) and regroups them by local expert; it wraps the
  TP-sharded experts in Megatron's f/g operators (identity forward / all-reduce backward on
  entry, all-reduce forward on exit).

Gradient sync: expert weights are identical across the ``edp`` ranks only, so the parameter
record syncs them over ``edp`` and divides by the whole DP size (their gradient already sums the
``ep`` ranks' tokens through the all-to-all backward); dense weights sync over ``dp``.
"""

from __future__ import annotations

import fnmatch
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Placement, Shard

from nxdt.errors import ConfigError

if TYPE_CHECKING:
    from nxdt.run_context import RunContext


# -- collectives with gradients --------------------------------------------------------------------
class _AllToAll(torch.autograd.Function):
    """Rows of ``x`` sent by ``in_splits`` and received by ``out_splits``; backward sends the gradients back."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, out_splits: list[int], in_splits: list[int], group: Any) -> torch.Tensor:
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        out_splits, in_splits = ctx.splits
        back = grad.new_empty((sum(in_splits), *grad.shape[1:]))
        dist.all_to_all_single(back, grad.contiguous(), in_splits, out_splits, group=ctx.group)
        return back, None, None, None


class _CopyToTP(torch.autograd.Function):
    """Megatron's f: identity forward; backward all-reduces the partial input gradients of TP-sharded experts."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromTP(torch.autograd.Function):
    """Megatron's g: all-reduce forward (row-parallel partial sums); identity backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:
        out = x.contiguous().clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


class _GatherSequence(torch.autograd.Function):
    """All-gather sequence slices (dim 1) over TP; backward keeps this rank's slice.

    Every TP rank computes the same gradient for the gathered sequence (routing is replicated and
    the experts' entry all-reduces), so the slice is the whole gradient of this rank's input.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any, rank: int, size: int) -> torch.Tensor:
        ctx.rank, ctx.local = rank, x.shape[1]
        pieces = [torch.empty_like(x) for _ in range(size)]
        dist.all_gather(pieces, x.contiguous(), group=group)
        return torch.cat(pieces, dim=1)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        return grad.narrow(1, ctx.rank * ctx.local, ctx.local).contiguous(), None, None, None


class _ScatterSequence(torch.autograd.Function):
    """This rank's sequence slice of a replicated tensor; backward all-gathers the slices' gradients."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any, rank: int, size: int) -> torch.Tensor:
        ctx.group, ctx.size = group, size
        local = x.shape[1] // size
        return x.narrow(1, rank * local, local).contiguous()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        pieces = [torch.empty_like(grad) for _ in range(ctx.size)]
        dist.all_gather(pieces, grad.contiguous(), group=ctx.group)
        return torch.cat(pieces, dim=1), None, None, None


# -- the comm an expert module uses ---------------------------------------------------------------
class ExpertParallelComm:
    """What an MoE layer needs from the process groups: SP gather/scatter, EP all-to-all, TP f/g."""

    def __init__(self, num_experts: int, ep_mesh: Any = None, tp_mesh: Any = None, sequence_parallel: bool = False):
        self.ep = ep_mesh.size() if ep_mesh is not None else 1
        self.ep_group = ep_mesh.get_group() if ep_mesh is not None else None
        self.tp = tp_mesh.size() if tp_mesh is not None else 1
        self.tp_group = tp_mesh.get_group() if tp_mesh is not None else None
        self.tp_rank = tp_mesh.get_local_rank() if tp_mesh is not None else 0
        self.sequence_parallel = sequence_parallel and self.tp > 1
        self.local_experts = num_experts // self.ep

    def gather_sequence(self, x: torch.Tensor) -> torch.Tensor:
        """The whole sequence (all-gathered under SP)."""
        if not self.sequence_parallel:
            return x
        return _GatherSequence.apply(x, self.tp_group, self.tp_rank, self.tp)

    def scatter_sequence(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's sequence slice (under SP)."""
        if not self.sequence_parallel:
            return x
        return _ScatterSequence.apply(x, self.tp_group, self.tp_rank, self.tp)

    def dispatch(self, x: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """Send token copies (sorted by expert) to their experts' ranks; regroup what arrives by local expert."""
        if self.ep == 1:
            return x, counts, None
        send = counts.view(self.ep, self.local_experts)  # [destination rank, its local expert]
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send.contiguous(), group=self.ep_group)  # [source rank, my local expert]
        in_splits, out_splits = send.sum(1).tolist(), recv.sum(1).tolist()
        received = _AllToAll.apply(x, out_splits, in_splits, self.ep_group)
        # Arrivals are ordered (source, expert); the experts need them (expert, source).
        expert = torch.arange(self.local_experts, device=x.device).repeat(self.ep)
        order = torch.argsort(torch.repeat_interleave(expert, recv.reshape(-1)), stable=True)
        return received[order], recv.sum(0), (order, in_splits, out_splits)

    def combine(self, y: torch.Tensor, ticket: Any) -> torch.Tensor:
        """Expert outputs back to the ranks (and the order) their tokens came from."""
        if ticket is None:
            return y
        order, in_splits, out_splits = ticket
        unsorted = y.new_empty(y.shape).index_copy(0, order, y) if y.shape[0] else y
        return _AllToAll.apply(unsorted, in_splits, out_splits, self.ep_group)

    def enter_experts(self, x: torch.Tensor) -> torch.Tensor:
        """f: the experts' TP shards each see all tokens; their input gradients are summed."""
        return _CopyToTP.apply(x, self.tp_group) if self.tp > 1 else x

    def leave_experts(self, y: torch.Tensor) -> torch.Tensor:
        """g: the row-parallel down projections' partial outputs summed over TP."""
        return _ReduceFromTP.apply(y, self.tp_group) if self.tp > 1 else y


# -- applying it ----------------------------------------------------------------------------------
def expert_param_names(model: nn.Module) -> list[str]:
    """Local names of expert weights: the parameters of modules declaring ``nxdt_expert_params``."""
    names = []
    for module_name, module in model.named_modules():
        for pname in getattr(module, "nxdt_expert_params", {}):
            names.append(f"{module_name}.{pname}".replace("_checkpoint_wrapped_module.", ""))
    return names


def _expert_mesh(ctx: RunContext) -> tuple[Any, list[str]]:
    """The ("ep", "tp") sub-mesh the experts' DTensors live on (only the dimensions larger than 1)."""
    dims = [d for d in ("ep", "tp") if getattr(ctx.parallel, d) > 1]
    return (ctx.mesh[tuple(dims)] if len(dims) > 1 else ctx.mesh[dims[0]]), dims


def shard_experts_(experts: nn.Module, mesh: Any, dims: list[str]) -> None:
    """Replace each expert weight by a DTensor: experts split over ``ep``, hidden channels over ``tp``."""
    params: dict[str, int] = getattr(experts, "nxdt_expert_params")  # noqa: B009
    for name, tp_dim in params.items():
        full = getattr(experts, name)
        local = full.detach()
        placements: list[Placement] = []
        for i, dim_name in enumerate(dims):
            split = 0 if dim_name == "ep" else tp_dim
            size = mesh.size(i) if len(dims) > 1 else mesh.size()
            rank = mesh.get_local_rank(i) if len(dims) > 1 else mesh.get_local_rank()
            if local.shape[split] % size:
                raise ConfigError(f"expert weight {name} {list(full.shape)}: dim {split} is not divisible by {dim_name}={size}")
            local = local.chunk(size, dim=split)[rank]
            placements.append(Shard(split))
        dtensor = DTensor.from_local(local.contiguous(), mesh, placements, run_check=False)
        experts.register_parameter(name, nn.Parameter(dtensor, requires_grad=full.requires_grad))


def apply_expert_parallel(model: nn.Module, ctx: RunContext, partial: bool = False) -> list[str]:
    """Split the experts of every module the plan styles ``expert`` over EP (and TP); returns their weights' names.

    ``partial``: ``model`` is one pipeline rank's part, so the plan may match none of its modules.
    """
    run, parallel = ctx.run, ctx.parallel
    plan = ctx.shard_plan()
    globs = [g for g, style in plan.as_dict(parallel.sequence_parallel).items() if style == "expert"]
    targets = [(n, m) for n, m in model.named_modules() if n and any(fnmatch.fnmatchcase(n, g) for g in globs)]
    if not targets and not partial and parallel.ep > 1:
        raise ConfigError(
            f"distributed_strategy.expert_model_parallel_size={parallel.ep}: the {run.family} shard plan styles no "
            "module 'expert', so there are no experts to split"
        )
    mesh, dims = _expert_mesh(ctx)
    ep_mesh = ctx.mesh["ep"] if parallel.ep > 1 else None
    tp_mesh = ctx.mesh["tp"] if parallel.tp > 1 else None
    names = []
    for name, module in targets:
        experts = getattr(module, "experts", None)
        if experts is None or not hasattr(experts, "nxdt_expert_params") or not hasattr(module, "comm"):
            raise ConfigError(f"shard plan styles {name!r} 'expert' but it has no `experts` with nxdt_expert_params and `comm`")
        shard_experts_(experts, mesh, dims)
        module.comm = ExpertParallelComm(module.num_experts, ep_mesh, tp_mesh, parallel.sequence_parallel)
        names += [f"{name}.experts.{p}" for p in experts.nxdt_expert_params]
    return names
