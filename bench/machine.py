"""What a benchmark ran on: CPU model, cores, library versions and the GPU if any."""

from __future__ import annotations

import contextlib
import os
import platform
from typing import Any

import torch


def describe_machine() -> dict[str, Any]:
    """CPU model, core count, torch/transformers/Python versions, and the GPU name when there is one."""
    import transformers

    cpu = platform.processor() or "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info
