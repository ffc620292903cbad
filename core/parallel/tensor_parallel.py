"""Tensor and sequence parallelism: a family's ShardPlan (plain data) mapped onto DTensor styles.

Without sequence parallelism activations between blocks are replicated over the TP group; with it
the residual stream stays sharded along the sequence (dim 1) and is all-gathered only where a
block needs the whole sequence (attention, MLP), the layout torchtitan's Llama plan uses. The
output layer keeps logits sharded over the vocabulary (a DTensor ``Shard(-1)``) so cross-entropy
runs under ``loss_parallel`` and full logits are never gathered.
"""

from __future__ import annotations

import fnmatch
from typing import Any

from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleOutput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from nxdt.errors import ConfigError
from nxdt.specs import ShardPlan


def _style(style: str, sequence_parallel: bool) -> ParallelStyle | None:
    """The DTensor style of one plan entry; None for ``replicate`` (plain tensors stay whole)."""
    seq = Shard(1) if sequence_parallel else Replicate()
    if style == "colwise":
        return AdapterColwise()
    if style == "rowwise":
        return AdapterRowwise(output_layouts=seq)
    if style == "embedding":
        return RowwiseParallel(input_layouts=Replicate(), output_layouts=seq)
    if style == "lm_head":
        return ColwiseParallel(input_layouts=seq, output_layouts=Shard(-1), use_local_output=False)
    if style == "sequence_norm":
        # Local outputs: a post-LN block adds the norm's output to the next sublayer's (local) output.
        return SequenceParallel(use_local_output=True) if sequence_parallel else None
    if style in ("replicate", "expert"):
        return None  # expert modules are split by nxdt.parallel.expert_parallel (EP, and TP inside them)
    if style == "sequence_output":
        # Learned positions: the table stays whole; under SP the output is cut to this rank's
        # sequence slice to join the sharded token embeddings (no communication forward).
        if not sequence_parallel:
            return None
        return PrepareModuleOutput(output_layouts=Replicate(), desired_output_layouts=Shard(1))
    raise ConfigError(f"shard plan style {style!r} is not a tensor-parallel style")


class AdapterColwise(ColwiseParallel):
    """Column-parallel Linear; a LoRA layer's ``lora_B`` is column-parallel with it, its ``lora_A`` replicated."""

    def _partition_linear_fn(self, name: str, module: nn.Module, device_mesh: Any) -> None:
        for pname, param in list(module.named_parameters(recurse=False)):
            placement = Replicate() if pname == "lora_A" else Shard(0)
            dist = distribute_tensor(param, device_mesh, [placement], src_data_rank=self.src_data_rank)
            module.register_parameter(pname, nn.Parameter(dist, requires_grad=param.requires_grad))


class AdapterRowwise(RowwiseParallel):
    """Row-parallel Linear; a LoRA layer's ``lora_A`` is row-parallel with it, its ``lora_B`` replicated."""

    def _partition_linear_fn(self, name: str, module: nn.Module, device_mesh: Any) -> None:
        if isinstance(module, nn.Linear):
            super()._partition_linear_fn(name, module, device_mesh)
        for pname, placement in (("lora_A", Shard(1)), ("lora_B", Replicate())):
            param = getattr(module, pname, None)
            if isinstance(param, nn.Parameter):
                dist = distribute_tensor(param, device_mesh, [placement], src_data_rank=self.src_data_rank)
                module.register_parameter(pname, nn.Parameter(dist, requires_grad=param.requires_grad))


def _block_inputs(model: nn.Module, plan: dict[str, str]) -> dict[str, ParallelStyle]:
    """Under SP, all-gather the sequence at the entry of every module whose children are colwise.

    A colwise child (attention's wq, the MLP's w1) needs the whole sequence; its parent module is
    where the sequence-sharded residual enters, so that parent gets a GatherSequenceInput that turns
    the first positional input from Shard(1) into Replicate and leaves the rest (rope tables, mask) alone.
    """
    parents: dict[str, ParallelStyle] = {}
    names = [name for name, _ in model.named_modules()]
    colwise = [n for n in names if any(fnmatch.fnmatchcase(n, g) for g, s in plan.items() if s == "colwise")]
    for child in colwise:
        parent = child.rpartition(".")[0]
        if not parent or parent in parents:
            continue
        parents[parent] = GatherSequenceInput()
    return parents


class GatherSequenceInput(ParallelStyle):
    """All-gather a module's first positional input from Shard(1) to Replicate; other inputs pass.

    Unlike PrepareModuleInput this does not fix the number of inputs, so a block may be called
    with or without its optional arguments (the decoding cache is passed only while decoding).
    """

    def _apply(self, module: nn.Module, device_mesh: Any) -> nn.Module:
        def gather(_: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
            x = args[0]
            if not isinstance(x, DTensor):
                x = DTensor.from_local(x, device_mesh, (Shard(1),), run_check=False)
            return (x.redistribute(placements=(Replicate(),)), *args[1:])

        module.register_forward_pre_hook(gather)
        return module


def apply_tensor_parallel(
    model: nn.Module, plan: ShardPlan, tp_mesh: Any, sequence_parallel: bool, partial: bool = False
) -> None:
    """Shard ``model`` in place over the 1-D ``tp_mesh`` following ``plan``'s FQN globs.

    ``partial`` (a pipeline rank's part of the model) allows rules that match no module here.
    """
    rules = plan.as_dict(sequence_parallel)
    module_plan: dict[str, ParallelStyle] = {}
    for name, _ in model.named_modules():
        if not name:
            continue
        matches = [style for glob, style in rules.items() if fnmatch.fnmatchcase(name, glob)]
        if len(set(matches)) > 1:
            raise ConfigError(f"shard plan: module {name!r} matches rules of different styles {sorted(set(matches))}")
        if matches and (style := _style(matches[0], sequence_parallel)) is not None:
            module_plan[name] = style
    unmatched = [g for g in rules if not any(fnmatch.fnmatchcase(n, g) for n, _ in model.named_modules())]
    if unmatched and not partial:
        raise ConfigError(f"shard plan rules {unmatched} match no module of the model")
    if sequence_parallel:
        module_plan.update(_block_inputs(model, rules))
    ties = _tied_names(model)
    # Some torch styles re-create parameters as trainable (SequenceParallel, leftover replication):
    # a frozen base (LoRA) must stay frozen.
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    parallelize_module(model, tp_mesh, module_plan)
    _restore_ties(model, ties)
    for name, p in model.named_parameters():
        if name in frozen:
            p.requires_grad_(False)


def _tied_names(model: nn.Module) -> list[list[str]]:
    """The FQNs of each parameter shared by several modules (a tied embedding and LM head)."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return [group for group in names.values() if len(group) > 1]


def _restore_ties(model: nn.Module, ties: list[list[str]]) -> None:
    """Share one sharded parameter again where a tie was: each module distributes its own copy of it."""
    for first, *others in ties:
        shared = model.get_parameter(first)
        for name in others:
            module_name, _, attr = name.rpartition(".")
            module = model.get_submodule(module_name)
            if getattr(getattr(module, attr), "placements", None) != getattr(shared, "placements", None):
                raise ConfigError(f"shard plan: tied parameters {first} and {name} are split differently; style them alike")
            setattr(module, attr, shared)
