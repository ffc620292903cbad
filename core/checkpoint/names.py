"""Checkpoint directory names: the ``filename`` template, its validation, and the names a run owns.

A template is literal text with ``{step}`` and ``{consumed_samples}`` fields (an optional format
spec such as ``{step:06d}``); as in Lightning a field becomes ``step=12``. NeMo's metric fields
(``{val_loss:.2f}``) are refused: nxdt names a checkpoint before any metric of it is known to
every rank. Validation runs when the config loads, so ``--dry-run`` and ``config validate``
report a bad template instead of the first save.

A save that replaces a complete checkpoint of the same name writes ``<name>.nxdt-staging-<step>``
first and swaps it in only once complete (the old one becomes ``<name>.nxdt-old-<step>`` for the
moment of the swap); those names are the run's own too.
"""

from __future__ import annotations

import re
from typing import Any

from nxdt.errors import ConfigError

DEFAULT_FILENAME = "nxdt--{step}-{consumed_samples}"
FIELDS = ("step", "consumed_samples")
TEMPLATE_KEY = "exp_manager.checkpoint_callback_params.filename"
STAGING = ".nxdt-staging-"
OLD = ".nxdt-old-"
_FIELD = re.compile(r"\{([^{}:]*)(?::([^{}]*))?\}")
_MAX_NAME = 200


def _bad(message: str) -> ConfigError:
    return ConfigError(f"{TEMPLATE_KEY}: {message}")


def _format(key: str, spec: str, value: int) -> str:
    try:
        return f"{key}={format(value, spec)}"
    except (ValueError, TypeError) as exc:
        raise _bad(f"{{{key}:{spec}}} is not a valid format for an integer ({exc})") from None


def render(template: str | None, values: dict[str, int]) -> str:
    """The directory name ``template`` gives for ``values`` (``{step}`` -> ``step=12``)."""
    template = template or DEFAULT_FILENAME
    pieces, pos = [], 0
    for m in _FIELD.finditer(template):
        pieces.append(template[pos:m.start()])
        key, spec = m.group(1), m.group(2) or ""
        if key not in FIELDS:
            raise _bad(f"{{{key}}} is not available (nxdt names checkpoints by {{step}} and {{consumed_samples}}; "
                       "metric fields such as NeMo's {val_loss:.2f} are not supported)")
        pieces.append(_format(key, spec, values[key]))
        pos = m.end()
    pieces.append(template[pos:])
    name = "".join(pieces)
    if "{" in name or "}" in name:
        raise _bad(f"unbalanced braces in {template!r}")
    _check_name(name, template)
    return name


def _check_name(name: str, template: str) -> None:
    if "/" in name or "\\" in name or ".." in name:
        raise _bad(f"{template!r} gives {name!r}: a checkpoint name may not contain '/', '\\' or '..'")
    if not name or name.startswith(".") or name != name.strip():
        raise _bad(f"{template!r} gives {name!r}: a checkpoint name may not be empty, start with '.' or "
                   "start or end with spaces")
    if any(ord(c) < 32 or c == "\x7f" for c in name):
        raise _bad(f"{template!r} contains control characters")
    if len(name) > _MAX_NAME:
        raise _bad(f"{template!r} gives a name longer than {_MAX_NAME} characters")
    if STAGING in name or OLD in name:
        raise _bad(f"{template!r}: names containing {STAGING!r} or {OLD!r} are reserved")


def check_template(template: str | None) -> None:
    """Raise a one-line ConfigError unless ``template`` gives valid names (checked with sample values)."""
    for sample in ({"step": 0, "consumed_samples": 0}, {"step": 123456789, "consumed_samples": 987654321}):
        render(template, sample)


def check_config(cfg: Any) -> None:
    """Config-time checks of the checkpoint settings (the ``filename`` template)."""
    check_template(cfg.exp_manager.checkpoint_callback_params.filename)


def name_pattern(template: str | None) -> re.Pattern[str]:
    """A regex matching exactly the names ``template`` gives, and their staging/old variants."""
    template = template or DEFAULT_FILENAME
    parts, pos = [], 0
    for m in _FIELD.finditer(template):
        parts.append(re.escape(template[pos:m.start()]))
        key, spec = m.group(1), m.group(2) or ""
        # plain and zero-padded integers are digits; any other format spec matches loosely
        number = r"-?\d+" if re.fullmatch(r"0?\d*d?", spec) else r"[^/]+?"
        parts.append(re.escape(f"{key}=") + number)
        pos = m.end()
    parts.append(re.escape(template[pos:]))
    suffix = f"(?:{re.escape(STAGING)}\\d+|{re.escape(OLD)}\\d+)?"
    return re.compile("^" + "".join(parts) + suffix + "$")


def staging_name(name: str, step: int) -> str:
    """Where a save that replaces complete checkpoint ``name`` writes first."""
    return f"{name}{STAGING}{step}"


def old_name(name: str, step: int) -> str:
    """What complete checkpoint ``name`` (of ``step``) is called while its successor is swapped in."""
    return f"{name}{OLD}{step}"
