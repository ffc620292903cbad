"""nxdt: a plugin-based model hub and distributed training engine on native PyTorch distributed."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

__version__ = "0.1.0"

#: Version of the plugin contract (hooks, ModelSpec fields, the model contract). Hooks only ever
#: gain keyword arguments and specs only gain fields with defaults, so a plugin written for an
#: older version keeps working; a plugin declares the version it needs as ``NXDT_PLUGIN_API``.
#: 2: model inputs declared by the spec, objectives with normalisers and metrics, recipes by task,
#: the run context, the per-parameter record and the model kit (nxdt.modeling).
PLUGIN_API_VERSION = 2

hookspec = pluggy.HookspecMarker("nxdt")
hookimpl = pluggy.HookimplMarker("nxdt")

if TYPE_CHECKING:
    import torch


def from_pretrained(path: str, **kwargs: Any) -> torch.nn.Module:
    """Load a transformers checkpoint directory (config.json + safetensors) as an nxdt model."""
    from nxdt.pretrained import from_pretrained as _impl

    return _impl(path, **kwargs)


__all__ = ["PLUGIN_API_VERSION", "__version__", "from_pretrained", "hookimpl", "hookspec"]
