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


class RecipeRegistry(Registry):
    """Recipes by name; one name may be registered once per task (``pretrain`` for causal and masked LMs)."""

    def __init__(self) -> None:
        super().__init__("recipe", lambda r: r.name)
        self.variants: dict[str, list[Any]] = {}

    def add(self, item: Any, source: str) -> None:
        """Add a recipe; the same name twice is an error only when the two serve a common task."""
        for other in self.variants.get(item.name, []):
            shared = not other.tasks or not item.tasks or set(other.tasks) & set(item.tasks)
            if shared:
                raise PluginError(
                    f"duplicate recipe {item.name!r} for the same task: registered by {self.sources[item.name]} "
                    f"and by {source}"
                )
        self.variants.setdefault(item.name, []).append(item)
        self.items.setdefault(item.name, item)
        self.sources.setdefault(item.name, source)

    def __iter__(self):
        return iter([r for variants in self.variants.values() for r in variants])

    def for_model(self, name: str, spec: ModelSpec) -> RecipeSpec:
        """The recipe called ``name`` that trains ``spec``'s task, or a one-line error naming what does."""
        variants = self.variants.get(name)
        if not variants:
            self.get(name)  # the unknown-name error with suggestions
            raise AssertionError("unreachable")
        for recipe in variants:
            if recipe.supports(spec):
                return recipe
        tasks = sorted({t for r in variants for t in r.tasks})
        fams = sorted({f for r in variants for f in r.families})
        what = f"the {', '.join(tasks)} task" if tasks else f"the families {', '.join(fams)}"
        fit = sorted({r.name for r in self if r.supports(spec)})
        raise NxdtError(
            f"recipe {name!r} trains {what}, not the {spec.family!r} family (task {spec.task!r}); "
            f"recipes for {spec.family}: {', '.join(fit) or 'none'}"
        )


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
        self.recipes = RecipeRegistry()

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
        if not isinstance(wanted, int) or wanted > nxdt.PLUGIN_API_VERSION:
            record.error = (
                f"needs plugin API {wanted}, but this nxdt {nxdt.__version__} provides plugin API "
                f"{nxdt.PLUGIN_API_VERSION}; upgrade nxdt or install an older release of the plugin"
            )
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
    def model_spec(self, family: str, plugin: str | None = None) -> ModelSpec:
        """The ModelSpec of ``family``, or an error naming why it is missing (plugin failed, not installed)."""
        if family not in self.models:
            record = self.records.get(plugin or family)
            if record is not None and not record.ok:
                raise NxdtError(f"the {family!r} family's plugin {record.name!r} failed to load: {record.error}")
            if record is not None:
                raise NxdtError(
                    f"plugin {record.name!r} registers presets of the {family!r} family but no model: "
                    "the model is not implemented yet"
                )
            raise NxdtError(
                f"no installed plugin provides the model family {family!r}; "
                f"install it (pip install nxdt-{family}) or check `nxdt plugins`"
            )
        return self.models.get(family)

    def preset(self, name: str) -> PresetSpec:
        """The preset called ``name`` (errors suggest the closest names and mention plugins that failed)."""
        if name not in self.presets:
            failed = [r for r in self.records.values() if not r.ok]
            if failed:
                why = "; ".join(f"plugin {r.name!r} failed to load: {r.error}" for r in failed)
                raise NxdtError(f"unknown preset {name!r}{did_you_mean(name, self.presets.items)} ({why})")
        return self.presets.get(name)

    def recipe(self, name: str, spec: ModelSpec | None = None) -> RecipeSpec:
        """The recipe called ``name`` (for ``spec``'s task when given)."""
        if spec is None:
            return self.recipes.get(name)
        return self.recipes.for_model(name, spec)

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

    def recipes_for(self, spec: ModelSpec | str) -> list[str]:
        """Names of the recipes that can train ``spec`` (a ModelSpec, or a family name)."""
        if isinstance(spec, str):
            if spec not in self.models:
                return []
            spec = self.models.get(spec)
        return sorted({r.name for r in self.recipes if r.supports(spec)})

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
