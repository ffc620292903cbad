"""nxdt: a plugin-based model hub and distributed training engine on native PyTorch distributed."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

__version__ = "0.1.0"

#: Version of the plugin contract (hook names and signatures). Hooks only ever gain keyword
#: arguments within one version; a plugin may declare the version it was written for.
PLUGIN_API_VERSION = 1

hookspec = pluggy.HookspecMarker("nxdt")
hookimpl = pluggy.HookimplMarker("nxdt")

if TYPE_CHECKING:
    import torch


def from_pretrained(path: str, **kwargs: Any) -> torch.nn.Module:
    """Load a transformers checkpoint directory (config.json + safetensors) as an nxdt model."""
    from nxdt.pretrained import from_pretrained as _impl

    return _impl(path, **kwargs)


__all__ = ["PLUGIN_API_VERSION", "__version__", "from_pretrained", "hookimpl", "hookspec"]
