"""``Checkpointable``: exactly what checkpoint save and load read from (and restore into) a training run.

The trainer implements it; anything else holding a run context, a parallelized model, its
optimizer and schedule, and a step counter can be checkpointed the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch

    from nxdt.config import RunConfig
    from nxdt.parallel.model import ParallelModel
    from nxdt.parallel.world import World
    from nxdt.run_context import RunContext
    from nxdt.specs import ParallelDims


class Checkpointable(Protocol):
    """A training run as checkpoints see it."""

    ctx: RunContext
    run_dir: Path
    model: ParallelModel
    optimizer: torch.optim.Optimizer
    scheduler: Any  # an LR scheduler with state_dict / load_state_dict
    state: Any  # step, consumed_samples, skipped_nan_steps

    @property
    def cfg(self) -> RunConfig:
        """The run's config."""
        ...

    @property
    def world(self) -> World:
        """This process's place in the run."""
        ...

    @property
    def parallel(self) -> ParallelDims:
        """The run's layout."""
        ...

    @property
    def mesh(self) -> Any:
        """The run's DeviceMesh (None in one process)."""
        ...

    @property
    def max_steps(self) -> int:
        """The step the run ends at."""
        ...
