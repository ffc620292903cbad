"""The plugin contract: every hook a plugin may implement (API version ``nxdt.PLUGIN_API_VERSION``).

Hooks are called with keyword arguments only and only ever gain arguments, so a plugin written
for an older version keeps working. ``register`` hooks add objects from ``nxdt.specs``; the
``firstresult`` hooks let a later plugin override what an earlier one provides.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from nxdt import hookspec
from nxdt.specs import DatasetSpec, LossSpec, ModelSpec, ParallelDims, PresetSpec, RecipeSpec, ShardPlan

if TYPE_CHECKING:
    from torch import nn


@hookspec
def nxdt_register_models(register: Callable[[ModelSpec], None]) -> None:
    """Register one ``ModelSpec`` per model family the plugin provides."""


@hookspec
def nxdt_register_presets(register: Callable[[PresetSpec], None]) -> None:
    """Register presets beyond hub_registry.toml (a duplicate name is an error naming both sources)."""


@hookspec
def nxdt_register_datasets(register: Callable[[DatasetSpec], None]) -> None:
    """Register named dataset builders that recipes resolve."""


@hookspec
def nxdt_register_losses(register: Callable[[LossSpec], None]) -> None:
    """Register named losses that recipes resolve (e.g. masked-LM, MoE auxiliary loss)."""


@hookspec
def nxdt_register_recipes(register: Callable[[RecipeSpec], None]) -> None:
    """Register training recipes (config defaults + dataset + loss + supported families)."""


@hookspec(firstresult=True)
def nxdt_build_model(spec: ModelSpec, config: Any) -> nn.Module | None:
    """Build the model for ``config`` (on the current default device); None to use ``spec.build_model``."""


@hookspec(firstresult=True)
def nxdt_shard_plan(spec: ModelSpec, config: Any, parallel: ParallelDims) -> ShardPlan | None:
    """Return a replacement shard plan for ``spec``'s family, or None to keep ``spec.shard_plan``."""
