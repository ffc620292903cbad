"""Load run configs: YAML files, layering, ``a.b=c`` overrides, ``${...}`` interpolation, strict validation.

Every failure is a one-line ``ConfigError`` naming the file or the dotted key at fault.
Interpolation is bounded before anything is resolved: references may nest at most
``MAX_INTERPOLATION_DEPTH`` deep and the resolved config may be at most
``MAX_RESOLVED_CHARS`` characters, so a few hundred bytes of nested ``${...}`` cannot expand into
gigabytes. Checkpoint ``filename`` templates are checked here too, so ``--dry-run`` and
``config validate`` report them.
"""

from __future__ import annotations

import types
from collections.abc import Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import Annotated, Any, Union, get_args, get_origin

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from pydantic import BaseModel, ValidationError

from nxdt.config.schema import RunConfig
from nxdt.errors import ConfigError, suggest


def _multiply(*factors: Any) -> Any:
    """``${multiply:a,b,...}``: the product of numbers (NxDT uses it for tp x pp)."""
    product: Any = 1
    for factor in factors:
        # Without this check "abc" * 2 would quietly give "abcabc".
        if isinstance(factor, bool) or not isinstance(factor, int | float):
            raise ValueError(f"multiply: {factor!r} is not a number")
        product *= factor
    return product


def register_resolvers() -> None:
    """Register nxdt's OmegaConf resolvers (idempotent: re-registering replaces)."""
    # OmegaConf 2.4 renamed register_new_resolver (now deprecated) to register_resolver.
    register = getattr(OmegaConf, "register_resolver", None) or OmegaConf.register_new_resolver
    register("multiply", _multiply, replace=True)


register_resolvers()


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read one YAML file as a plain dict, leaving ``${...}`` interpolations unresolved."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    _check_yaml_aliases(path)
    try:
        # OmegaConf's YAML loader reads 1e-5 as a float (plain YAML 1.1 reads it as a string)
        # and rejects duplicate keys.
        cfg = OmegaConf.load(path)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or _first_line(exc)
        raise ConfigError(f"{where}: invalid YAML: {problem}") from None
    except (OmegaConfBaseException, OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: {_first_line(exc)}") from None
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"{path}: expected a mapping of config sections at the top level")
    return OmegaConf.to_container(cfg, resolve=False)  # type: ignore[return-value]


MAX_YAML_NODES = 1_000_000


def _check_yaml_aliases(path: Path) -> None:
    """Refuse a YAML file whose anchors and aliases expand to more than MAX_YAML_NODES nodes.

    Aliases share one node in the parsed graph, but building the config copies it for every
    alias, so nested aliases ("billion laughs") grow exponentially. The graph is composed, not
    constructed, and its expanded size counted with memoisation.
    """
    try:
        with open(path, encoding="utf-8") as f:
            root = yaml.compose(f, Loader=yaml.SafeLoader)
    except (yaml.YAMLError, OSError, UnicodeDecodeError):
        return  # OmegaConf reports these itself
    sizes: dict[int, int] = {}

    def size(node: Any) -> int:
        if id(node) in sizes:
            return sizes[id(node)]
        sizes[id(node)] = 1  # a recursive alias counts once here; OmegaConf rejects it
        if isinstance(node, yaml.MappingNode):
            total = 1 + sum(size(k) + size(v) for k, v in node.value)
        elif isinstance(node, yaml.SequenceNode):
            total = 1 + sum(size(v) for v in node.value)
        else:
            total = 1
        sizes[id(node)] = total
        return total

    if root is not None and size(root) > MAX_YAML_NODES:
        raise ConfigError(f"{path}: YAML anchors and aliases expand to more than {MAX_YAML_NODES:,} values")


def compose(layers: Sequence[Mapping[str, Any] | None], overrides: Sequence[str] = ()) -> RunConfig:
    """Merge ``layers`` (later wins), apply ``key=value`` overrides, resolve ``${...}``, validate."""
    try:
        merged = OmegaConf.create({})
        for layer in layers:
            merged = _merge(merged, OmegaConf.create(dict(layer or {})), "config layers")
        for item in overrides:
            merged = _merge(merged, _override(item), f"override {item!r}")
        check_interpolation(OmegaConf.to_container(merged, resolve=False))
        data = OmegaConf.to_container(merged, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None)
        raise ConfigError(f"{key}: {_first_line(exc)}" if key else _first_line(exc)) from None
    return validate(data)  # type: ignore[arg-type]


def load_run_config(path: str | Path, overrides: Sequence[str] = ()) -> RunConfig:
    """Load, override, interpolate and validate one YAML file."""
    return compose([load_yaml(path)], overrides)


def validate(data: Mapping[str, Any]) -> RunConfig:
    """Validate resolved plain data into a RunConfig, translating pydantic errors into one line."""
    from nxdt.checkpoint.names import check_config

    try:
        cfg = RunConfig.model_validate(dict(data))
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from None
    check_config(cfg)
    return cfg


# -- bounded interpolation --------------------------------------------------------------------

MAX_INTERPOLATION_DEPTH = 32
MAX_RESOLVED_CHARS = 8 << 20


def check_interpolation(tree: Any) -> None:
    """Refuse ``${...}`` references that nest deeper or resolve larger than the bounds, without resolving them.

    Sizes are estimated per node (memoised), so the check is linear in the unresolved config
    however large the resolved one would be. Resolver calls count as their arguments; a
    missing or cyclic reference counts as nothing here (OmegaConf reports it).
    """
    _Estimator(tree).check()


class _Estimator:
    """Estimated resolved sizes and reference depths of an unresolved config tree."""

    def __init__(self, tree: Any):
        self.tree = tree
        self.memo: dict[tuple[str, ...], tuple[int, int]] = {}
        self.active: set[tuple[str, ...]] = set()

    def check(self) -> None:
        """Raise when the whole config would resolve larger than the bound."""
        size, _ = self.node(())
        if size > MAX_RESOLVED_CHARS:
            raise ConfigError(f"config: ${{...}} interpolation would expand the config to about {size:,} characters "
                              f"(the limit is {MAX_RESOLVED_CHARS:,})")

    def lookup(self, path: tuple[str, ...]) -> Any:
        """The unresolved node at ``path``, or _MISSING."""
        node = self.tree
        for part in path:
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                return _MISSING
        return node

    def node(self, path: tuple[str, ...]) -> tuple[int, int]:
        """(estimated resolved size in characters, reference depth) of the node at ``path``."""
        if path in self.memo:
            return self.memo[path]
        if path in self.active:
            return 0, 0  # a cycle: OmegaConf reports it
        self.active.add(path)
        value = self.lookup(path)
        if isinstance(value, dict):
            parts = [self.node((*path, str(k))) for k in value]
            result = (sum(len(str(k)) + 4 + p[0] for k, p in zip(value, parts)), max((p[1] for p in parts), default=0))
        elif isinstance(value, list):
            parts = [self.node((*path, str(i))) for i in range(len(value))]
            result = (sum(p[0] + 2 for p in parts), max((p[1] for p in parts), default=0))
        elif isinstance(value, str) and "${" in value:
            result = self.text(value, path[:-1])
        else:
            result = (len(str(value)), 0)
        self.active.discard(path)
        if result[1] > MAX_INTERPOLATION_DEPTH:
            raise ConfigError(f"{'.'.join(path)}: ${{...}} references nest deeper than {MAX_INTERPOLATION_DEPTH}")
        if result[0] > MAX_RESOLVED_CHARS:
            raise ConfigError(f"{'.'.join(path)}: ${{...}} interpolation would expand it to about {result[0]:,} "
                              f"characters (the limit is {MAX_RESOLVED_CHARS:,})")
        self.memo[path] = result
        return result

    def text(self, text: str, parent: tuple[str, ...]) -> tuple[int, int]:
        """Size and depth of a string with interpolations, its references resolved against ``parent``."""
        size, depth, i = 0, 0, 0
        while i < len(text):
            if text.startswith("\\${", i):
                size, i = size + 2, i + 3
                continue
            if not text.startswith("${", i):
                size, i = size + 1, i + 1
                continue
            end, level, j = -1, 0, i
            while j < len(text):
                if text.startswith("${", j):
                    level, j = level + 1, j + 2
                    continue
                if text[j] == "}":
                    level -= 1
                    if level == 0:
                        end = j
                        break
                j += 1
            if end < 0:  # unbalanced: OmegaConf reports the syntax error
                return size + len(text) - i, depth
            inner = text[i + 2:end]
            s, d = self.interpolation(inner, parent)
            size, depth, i = size + s, max(depth, d + 1), end + 1
        return size, depth

    def interpolation(self, inner: str, parent: tuple[str, ...]) -> tuple[int, int]:
        """Size and depth of one ``${inner}``: a node reference or a resolver call."""
        head, colon, args = inner.partition(":")
        if colon and "${" not in head and not head.startswith("."):  # a resolver call
            size, depth = self.text(args, parent) if "${" in args else (len(args), 0)
            for token in args.split(","):  # oc.select-style key arguments reference nodes too
                path = self.path(token.strip(), parent)
                if path and self.lookup(path) is not _MISSING:
                    s, d = self.node(path)
                    size, depth = size + s, max(depth, d)
            return size, depth
        if "${" in inner:  # a key computed by a nested interpolation: count what builds it
            return self.text(inner, parent)
        path = self.path(inner.strip(), parent)
        if path is None or self.lookup(path) is _MISSING:
            return len(inner), 0
        return self.node(path)

    @staticmethod
    def path(ref: str, parent: tuple[str, ...]) -> tuple[str, ...] | None:
        """The absolute key path of reference ``ref`` (``a.b``, ``a[0]``, ``.sibling``, ``..uncle``)."""
        if not ref:
            return None
        ref = ref.replace("[", ".").replace("]", "")
        if ref.startswith("."):
            dots = len(ref) - len(ref.lstrip("."))
            base = parent[: len(parent) - (dots - 1)] if dots - 1 <= len(parent) else ()
            rest = ref[dots:]
            return (*base, *[p for p in rest.split(".") if p])
        return tuple(p for p in ref.split(".") if p)


_MISSING = object()


def _merge(base: DictConfig, layer: DictConfig, what: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, layer)  # type: ignore[return-value]
    except TypeError:  # e.g. `trainer=[1,2]` over the trainer mapping
        raise ConfigError(f"{what}: a mapping and a list cannot replace each other") from None


def _override(item: str) -> DictConfig:
    key, sep, _ = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r}: expected key=value, e.g. trainer.max_steps=100")
    try:
        # Values are parsed as YAML, so `a=[1,2]` is a list and `a=null` is None.
        return OmegaConf.from_dotlist([item])
    except (OmegaConfBaseException, yaml.YAMLError) as exc:
        raise ConfigError(f"override {item!r}: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# -- pydantic errors -> one line --------------------------------------------------------------


def format_validation_error(exc: ValidationError) -> str:
    """The first error as ``dotted.path: message``, plus how many other keys are wrong."""
    errors = exc.errors(include_url=False)
    first = errors[0]
    path, text = _describe(first)
    # A union reports one error per member; count keys, not errors.
    others = {_describe(err)[0] for err in errors[1:]} - {path}
    message = f"{path}: {text}" if path else text
    return message + (f" (and {len(others)} more)" if others else "")


def _describe(err: Mapping[str, Any]) -> tuple[str, str]:
    loc = tuple(err["loc"])
    if err["type"] == "extra_forbidden" and loc:
        parent_path, parent = _walk(loc[:-1])
        key = str(loc[-1])
        path = f"{parent_path}.{key}" if parent_path else key
        return path, "unknown key" + _hint(key, parent)
    path, _ = _walk(loc)
    text = str(err["msg"])
    if err["type"] in ("value_error", "assertion_error"):
        return path, text.split(", ", 1)[-1]  # drop pydantic's "Value error, " prefix
    return path, text + _got(err.get("input"))


def _got(value: Any) -> str:
    shown = repr(value)
    return f" (got {shown})" if len(shown) <= 60 else f" (got a {type(value).__name__})"


def _hint(key: str, parent: Any) -> str:
    """Where else the key is valid, else the nearest valid key here, else the valid keys here."""
    if not _is_model(parent):
        return ""
    homes = _homes().get(key)
    if homes:  # NeMo keeps e.g. micro_batch_size under model; NxDT under data
        return f"; it belongs at {' or '.join(homes)}"
    valid = list(_fields(parent))
    close = suggest(key, valid, n=1)
    if close:
        return f"; did you mean {close[0]!r}?"
    return f"; valid keys here: {', '.join(valid)}" if len(valid) <= 12 else ""


def _walk(loc: Sequence[Any]) -> tuple[str, Any]:
    """Dotted path of a pydantic ``loc`` and the type found there (None when unknown)."""
    parts: list[str] = []
    tp: Any = RunConfig
    for seg in loc:
        tp = _unwrap(tp)
        if isinstance(seg, int) and parts:
            parts[-1] += f"[{seg}]"
            args = get_args(tp)
            tp = args[0] if get_origin(tp) in (list, tuple) and args else None
        elif _is_model(tp):
            field = _fields(tp).get(seg)
            parts.append(str(seg))
            tp = field.annotation if field else None
        elif get_origin(tp) is dict or tp is None:
            parts.append(str(seg))
            tp = get_args(tp)[1] if get_args(tp) else None
        else:
            break  # pydantic's name of a union member or a validator, not a user key
    return ".".join(parts), _unwrap(tp)


def _unwrap(tp: Any) -> Any:
    while True:
        origin = get_origin(tp)
        if origin is Annotated:
            tp = get_args(tp)[0]
        elif origin in (Union, types.UnionType):
            members = [a for a in get_args(tp) if a is not type(None)]
            if len(members) != 1:
                return tp
            tp = members[0]
        else:
            return tp


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _fields(model: type[BaseModel]) -> dict[str, Any]:
    return {field.alias or name: field for name, field in model.model_fields.items()}


@cache
def _homes() -> dict[str, list[str]]:
    """Every key name -> the dotted paths where it is valid (for keys put in the wrong section)."""
    homes: dict[str, list[str]] = {}

    def visit(model: type[BaseModel], prefix: str) -> None:
        for key, field in _fields(model).items():
            homes.setdefault(key, []).append(prefix + key)
            inner = _unwrap(field.annotation)
            if _is_model(inner):
                visit(inner, f"{prefix}{key}.")

    visit(RunConfig, "")
    return homes
