"""Discovers plugins through entry points, validates them, and collects what they register.

One broken plugin never stops the others: import errors, unknown hooks and failing hook calls
are recorded on that plugin's ``PluginRecord`` and shown by ``nxdt plugins``.
"""

from __future__ import annotations

import os
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points
from typing import Any

import pluggy

import nxdt
from nxdt import hookspecs
from nxdt.errors import NxdtError, PluginError, did_you_mean
from nxdt.specs import DatasetSpec, LossSpec, ModelSpec, ParallelDims, PresetSpec, RecipeSpec, ShardPlan

ENTRY_POINT_GROUP = "nxdt.plugins"
#: the engine's own registrations (built-in recipes, datasets, losses) use this plugin name
CORE_PLUGIN = "nxdt"


@dataclass
class PluginRecord:
    """One discovered plugin: where it came from, what it implements, and what went wrong."""

    name: str
    distribution: str
    version: str
    module: str
    hooks: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def ok(self) -> bool:
        """Whether the plugin loaded and all its hooks ran."""
        return self.error is None


class Registry:
    """Named objects of one kind, remembering which plugin registered each name."""

    def __init__(self, kind: str, key: Callable[[Any], str]):
        self.kind, self._key = kind, key
        self.items: dict[str, Any] = {}
        self.sources: dict[str, str] = {}

    def add(self, item: Any, source: str) -> None:
        """Add ``item``; a second registration of the same name is an error naming both sources."""
        name = self._key(item)
        if name in self.items:
            raise PluginError(f"duplicate {self.kind} {name!r}: registered by {self.sources[name]} and by {source}")
        self.items[name] = item
        self.sources[name] = source

    def get(self, name: str) -> Any:
        """The item called ``name``, or a one-line error suggesting the closest names."""
        try:
            return self.items[name]
        except KeyError:
            raise NxdtError(f"unknown {self.kind} {name!r}{did_you_mean(name, self.items)}") from None

    def __contains__(self, name: object) -> bool:
        return name in self.items

    def __iter__(self):
        return iter(self.items.values())


class PluginHost:
    """The loaded plugin manager plus every model, preset, dataset, loss and recipe registered."""

    def __init__(self, only: Iterable[str] | None = None, extra_plugins: Iterable[tuple[str, object]] = ()):
        self.pm = pluggy.PluginManager("nxdt")
        self.pm.add_hookspecs(hookspecs)
        self.records: dict[str, PluginRecord] = {}
        self.models = Registry("model family", lambda s: s.family)
        self.presets = Registry("preset", lambda p: p.name)
        self.datasets = Registry("dataset", lambda d: d.name)
        self.losses = Registry("loss", lambda spec: spec.name)
        self.recipes = Registry("recipe", lambda r: r.name)

        from nxdt.recipes import builtin

        self._register(CORE_PLUGIN, builtin, PluginRecord(CORE_PLUGIN, "nxdt", nxdt.__version__, builtin.__name__))
        for ep in _entry_points(only):
            self._load_entry_point(ep)
        for name, module in extra_plugins:
            self._register(name, module, PluginRecord(name, "(in-process)", "", getattr(module, "__name__", name)))

        from nxdt.hub import load_hub_presets

        for preset in load_hub_presets():
            self.presets.add(preset, preset.source)
        self._collect("nxdt_register_models", self.models)
        self._collect("nxdt_register_presets", self.presets)
        self._collect("nxdt_register_datasets", self.datasets)
        self._collect("nxdt_register_losses", self.losses)
        self._collect("nxdt_register_recipes", self.recipes)

    # -- discovery -------------------------------------------------------------------------
    def _load_entry_point(self, ep: EntryPoint) -> None:
        dist = ep.dist
        record = PluginRecord(
            name=ep.name,
            distribution=dist.name if dist else "?",
            version=dist.version if dist else "?",
            module=ep.value,
        )
        try:
            module = ep.load()
        except Exception as exc:  # any import failure is the plugin's, never ours
            record.error = f"import failed: {type(exc).__name__}: {exc}"
            self.records[ep.name] = record
            return
        self._register(ep.name, module, record)

    def _register(self, name: str, module: object, record: PluginRecord) -> None:
        self.records[name] = record
        wanted = getattr(module, "NXDT_PLUGIN_API", nxdt.PLUGIN_API_VERSION)
        if wanted > nxdt.PLUGIN_API_VERSION:
            record.error = f"needs plugin API {wanted}, this nxdt provides {nxdt.PLUGIN_API_VERSION}"
            return
        try:
            self.pm.register(module, name=name)
            # check_pending flags hook implementations that match no spec (a misspelled hook).
            self.pm.check_pending()
        except Exception as exc:
            record.error = f"invalid plugin: {exc}"
            if self.pm.is_registered(module):
                self.pm.unregister(module)
            return
        record.hooks = sorted(caller.name for caller in self.pm.get_hookcallers(module) or [])

    def _collect(self, hook_name: str, registry: Registry) -> None:
        """Call one register hook plugin by plugin so a failure is charged to the right plugin."""
        for impl in getattr(self.pm.hook, hook_name).get_hookimpls():
            record = self.records[impl.plugin_name]
            if not record.ok:
                continue

            def register(item: Any, _source: str = impl.plugin_name) -> None:
                item_plugin = getattr(item, "plugin", None)
                if item_plugin == "":
                    item = _with_plugin(item, _source)
                registry.add(item, f"plugin {_source!r}" if _source != CORE_PLUGIN else "nxdt core")

            try:
                impl.function(register=register)
            except Exception as exc:
                record.error = f"{hook_name} failed: {type(exc).__name__}: {exc}"
                if os.environ.get("NXDT_DEBUG"):
                    traceback.print_exc()

    # -- lookups ---------------------------------------------------------------------------
    def model_spec(self, family: str) -> ModelSpec:
        """The ModelSpec of ``family``, or an error naming the plugin to install."""
        if family not in self.models:
            raise NxdtError(
                f"no installed plugin provides the model family {family!r}; "
                f"install it (pip install nxdt-{family}) or check `nxdt plugins`"
            )
        return self.models.get(family)

    def preset(self, name: str) -> PresetSpec:
        """The preset called ``name`` (errors suggest the closest names)."""
        return self.presets.get(name)

    def recipe(self, name: str) -> RecipeSpec:
        """The recipe called ``name``."""
        return self.recipes.get(name)

    def dataset(self, name: str) -> DatasetSpec:
        """The dataset builder called ``name``."""
        return self.datasets.get(name)

    def loss(self, name: str) -> LossSpec:
        """The loss called ``name``."""
        return self.losses.get(name)

    def build_model(self, spec: ModelSpec, config: Any) -> Any:
        """Build through the ``nxdt_build_model`` override hook, else the family's own builder."""
        model = self.pm.hook.nxdt_build_model(spec=spec, config=config)
        return model if model is not None else spec.build_model(config)

    def shard_plan(self, spec: ModelSpec, config: Any, parallel: ParallelDims) -> ShardPlan:
        """The shard plan in force: a plugin's override through ``nxdt_shard_plan``, else the family's."""
        plan = self.pm.hook.nxdt_shard_plan(spec=spec, config=config, parallel=parallel)
        return plan if plan is not None else spec.shard_plan(config, parallel)

    def recipes_for(self, family: str) -> list[str]:
        """Names of the recipes that support ``family``."""
        return sorted(r.name for r in self.recipes if r.supports(family))

    def plugin_version(self, name: str) -> str:
        """The version of the distribution that provides plugin ``name``."""
        record = self.records.get(name)
        return record.version if record else "?"


def _with_plugin(item: Any, plugin: str) -> Any:
    import dataclasses

    if dataclasses.is_dataclass(item) and not isinstance(item, type):
        return dataclasses.replace(item, plugin=plugin)
    return item


def _entry_points(only: Iterable[str] | None) -> list[EntryPoint]:
    selected = list(entry_points(group=ENTRY_POINT_GROUP))
    if only is None:
        env = os.environ.get("NXDT_LOAD_PLUGINS")
        only = [n.strip() for n in env.split(",") if n.strip()] if env else None
    if only is not None:
        wanted = set(only)
        selected = [ep for ep in selected if ep.name in wanted]
    # A plugin installed twice (two distributions, one name) would register everything twice.
    seen: dict[str, EntryPoint] = {}
    for ep in selected:
        seen.setdefault(ep.name, ep)
    return sorted(seen.values(), key=lambda ep: ep.name)


_HOST: PluginHost | None = None


def get_host(reload: bool = False) -> PluginHost:
    """The process-wide plugin host, loaded on first use."""
    global _HOST
    if _HOST is None or reload:
        _HOST = PluginHost()
    return _HOST


__all__ = ["ENTRY_POINT_GROUP", "PluginHost", "PluginRecord", "Registry", "get_host"]
