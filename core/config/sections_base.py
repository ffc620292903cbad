"""Building blocks shared by every config section: strict models and backend-only keys."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

#: Key in a field's ``json_schema_extra`` naming the backends that read the key.
BACKENDS = "nxdt_backends"


class Section(BaseModel):
    """A config section: unknown keys are errors, and an empty YAML section means all defaults."""

    # NxDT's own key names start with "model_" (model_source, model_config, ...).
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    @model_validator(mode="before")
    @classmethod
    def _empty_section(cls, data: Any) -> Any:
        # `trainer:` with only comments under it loads as None; treat it as an empty mapping.
        return {} if data is None else data

    def backend_keys(self, prefix: str = "") -> Iterator[tuple[str, tuple[str, ...]]]:
        """Yield (dotted path, backends) for every backend-only key that holds a value."""
        for name, field in type(self).model_fields.items():
            value = getattr(self, name)
            key = f"{prefix}{field.alias or name}"
            extra = field.json_schema_extra
            if isinstance(extra, dict) and BACKENDS in extra and value is not None:
                yield key, tuple(extra[BACKENDS])  # type: ignore[arg-type]
            elif isinstance(value, Section):
                yield from value.backend_keys(key + ".")


def backend_only(*backends: str, default: Any = None, **kwargs: Any) -> Any:
    """A field read only on ``backends`` (e.g. "neuron"); other backends report it as unused."""
    return Field(default, json_schema_extra={BACKENDS: list(backends)}, **kwargs)


def _scalar_to_str(value: Any) -> Any:
    # YAML reads `version: 2` or `xla_use_bf16: 0` as numbers where NxDT means strings.
    if isinstance(value, bool):
        return str(int(value))
    return str(value) if isinstance(value, int | float) else value


#: A string that also accepts a YAML number (version strings, "0"/"1" environment flags).
Str = Annotated[str, BeforeValidator(_scalar_to_str)]
