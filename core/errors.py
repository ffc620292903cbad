"""User-facing errors: the CLI prints these as one line and exits non-zero."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class NxdtError(Exception):
    """An error caused by the user's input; shown without a traceback."""

    exit_code = 1


class ConfigError(NxdtError):
    """A configuration that cannot be loaded or does not validate."""

    exit_code = 2


class PluginError(NxdtError):
    """A plugin that misbehaves (duplicate names, missing family, bad hook result)."""


def suggest(word: str, choices: Iterable[str], n: int = 3) -> list[str]:
    """Return the closest names to ``word`` among ``choices`` (best first)."""
    return difflib.get_close_matches(word, list(choices), n=n, cutoff=0.5)


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """A '; did you mean ...?' suffix, or an empty string when nothing is close."""
    close = suggest(word, choices)
    return f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
