"""``model.fusions.torch_compile``: ``torch.compile`` applied per repeated block, as torchtitan does.

Blocks are compiled in place (``nn.Module.compile``), after tensor parallelism and activation
checkpointing and before data parallelism, so parameter names stay the single-device ones that
checkpoints, records and the shard plan use. Blocks share their code, so one compilation serves
them all. A family that declares no blocks is compiled whole.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn


def compile_blocks(model: nn.Module, blocks: Sequence[str]) -> int:
    """Compile each of ``blocks`` (FQNs) that this rank holds, or ``model`` whole without blocks; returns the count."""
    held = dict(model.named_modules())
    targets = [held[name] for name in blocks if name in held]
    if not blocks:
        targets = [model]
    for module in targets:
        # Not fullgraph: a mixture-of-experts block's routing has data-dependent shapes, which break the graph.
        module.compile()
    return len(targets)
