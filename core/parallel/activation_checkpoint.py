"""Activation checkpointing: recompute whole blocks (``full``) or named modules (``selective``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper

from nxdt.errors import ConfigError


def _wrap_children(model: nn.Module, predicate) -> int:
    """Replace every submodule for which ``predicate(name, module)`` holds by its checkpointed wrapper."""
    targets = [(name, m) for name, m in model.named_modules() if name and predicate(name, m)]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        # Non-reentrant checkpointing works with DTensor hooks, keyword inputs and no-grad inputs.
        setattr(parent, child, checkpoint_wrapper(module, checkpoint_impl=CheckpointImpl.NO_REENTRANT))
    return len(targets)


def apply_activation_checkpointing(
    model: nn.Module,
    granularity: str | None,
    recompute: Sequence[str] | None,
    recompute_modules: Mapping[str, type],
    blocks: Sequence[str],
) -> int:
    """Wrap ``model`` for ``activations_checkpoint_granularity``; returns how many modules were wrapped.

    ``full`` wraps every repeated block (``blocks``: FQNs from the spec's ``pipeline_blocks``);
    ``selective`` wraps every instance of the classes ``recompute`` names among ``recompute_modules``.
    """
    if not granularity:
        return 0
    if granularity == "full":
        wanted = set(blocks)
        if not wanted:
            raise ConfigError("activations_checkpoint_granularity=full: this model family declares no blocks to wrap")
        return _wrap_children(model, lambda name, _m: name in wanted)
    if granularity == "selective":
        names = list(recompute or [])
        valid = sorted(recompute_modules)
        unknown = [n for n in names if n not in recompute_modules]
        if unknown or not names:
            raise ConfigError(
                f"model.activations_checkpoint_recompute: {unknown or 'nothing'} "
                f"{'is not a recomputable module' if unknown else 'named'}; valid names for this family: {valid}"
            )
        classes = tuple(recompute_modules[n] for n in names)
        return _wrap_children(model, lambda _n, m: isinstance(m, classes))
    raise ConfigError(f"model.activations_checkpoint_granularity: {granularity!r}; expected 'full' or 'selective'")
