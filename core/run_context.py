"""``RunContext``: what building a model, its data or its memory plan needs to know about a run.

It is passed explicitly to parallelize, data, the fit check and checkpointing instead of a
trainer, so that a second, frozen model (a DPO reference) or a plan without any trainer (the
memory planner, ``--dry-run``) can be built from the same facts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nxdt.config import ResolvedPrecision, RunConfig
    from nxdt.parallel.world import World
    from nxdt.plugin_host import PluginHost
    from nxdt.resolve import ResolvedRun
    from nxdt.specs import ModelSpec, ParallelDims


@dataclass
class RunContext:
    """A resolved run placed on a world: config, family, layout, mesh, precision and batch arithmetic."""

    run: ResolvedRun
    world: World
    parallel: ParallelDims
    mesh: Any  # DeviceMesh over ("pp", "dp", "cp", "tp"), None in one process
    precision: ResolvedPrecision
    grad_accum: int
    host: PluginHost

    @classmethod
    def create(cls, run: ResolvedRun, world: World, host: PluginHost | None = None, mesh: Any = "build") -> RunContext:
        """The context of ``run`` on ``world``; builds the DeviceMesh (a collective) unless ``mesh`` is given."""
        from nxdt.parallel.world import build_mesh
        from nxdt.plugin_host import get_host
        from nxdt.resolve import gradient_accumulation

        parallel = run.parallel_dims(world.world_size)
        cfg = run.config
        return cls(
            run=run,
            world=world,
            parallel=parallel,
            mesh=build_mesh(world, parallel) if mesh == "build" else mesh,
            precision=cfg.precision.resolved(cfg.model.optim.name),
            grad_accum=gradient_accumulation(cfg, parallel.dp),
            host=host or get_host(),
        )

    @property
    def cfg(self) -> RunConfig:
        """The validated run config."""
        return self.run.config

    @property
    def spec(self) -> ModelSpec:
        """The family's ModelSpec."""
        return self.run.spec

    @property
    def arch(self) -> Any:
        """The family's architecture config."""
        return self.run.arch

    @property
    def dp_rank(self) -> int:
        """This rank's index in its data-parallel group."""
        return self.mesh["dp"].get_local_rank() if self.mesh is not None else 0

    def shard_plan(self) -> Any:
        """The shard plan in force (a plugin's nxdt_shard_plan override, else the family's); refusals are ConfigErrors."""
        from nxdt.errors import ConfigError

        try:
            return self.host.shard_plan(self.spec, self.arch, self.parallel)
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc

    def group(self, dim: str) -> Any:
        """The process group of mesh dimension ``dim`` when it spans more than one rank, else None."""
        if self.mesh is None or getattr(self.parallel, dim, 1) <= 1:
            return None
        return self.mesh[dim].get_group()
