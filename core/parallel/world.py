"""The process world: process-group start-up, the device, and the named DeviceMesh of a run."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from nxdt.specs import ParallelDims

#: mesh dimension names, outermost first (pipeline stages are furthest apart, TP ranks closest)
MESH_DIMS = ("pp", "dp", "cp", "tp")


@dataclass
class World:
    """This process's place in the run."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None

    @property
    def is_distributed(self) -> bool:
        """Whether a process group spans more than this process."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 logs, prints and writes the run's shared files."""
        return self.rank == 0


def pick_device(requested: str | None = None) -> torch.device:
    """CUDA when present (one GPU per local rank), else CPU; ``NXDT_DEVICE=cpu`` forces CPU."""
    requested = requested or os.environ.get("NXDT_DEVICE")
    if requested:
        return torch.device(requested)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    return torch.device("cpu")


#: ``distributed_strategy.collective_timeout_s`` when the config leaves it unset
DEFAULT_COLLECTIVE_TIMEOUT_S = 600


_timeout_s: float = DEFAULT_COLLECTIVE_TIMEOUT_S


def configured_timeout() -> float:
    """The collective timeout (seconds) this process's groups use."""
    return _timeout_s


def set_collective_timeout(timeout_s: float) -> None:
    """Make ``timeout_s`` the timeout of every process group created from now on.

    torch gives groups created without a timeout (DeviceMesh sub-groups, new_group) its own
    default (30 minutes for gloo) rather than the world's, so the default itself is set: a stuck
    rank then ends every collective waiting for it within the configured bound.
    """
    from torch.distributed import distributed_c10d

    global _timeout_s
    _timeout_s = timeout_s
    timeout = timedelta(seconds=timeout_s)
    distributed_c10d.default_pg_timeout = timeout  # type: ignore[attr-defined]
    if hasattr(distributed_c10d, "default_pg_nccl_timeout"):
        distributed_c10d.default_pg_nccl_timeout = timeout  # type: ignore[attr-defined]


def init_world(device: str | None = None, timeout_s: float = DEFAULT_COLLECTIVE_TIMEOUT_S) -> World:
    """Join the process group torchrun describes in the environment (gloo on CPU, NCCL on CUDA).

    ``timeout_s`` bounds every collective (``distributed_strategy.collective_timeout_s``): a rank
    that stops answering makes the others fail after it instead of hanging.
    """
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    dev = pick_device(device)
    backend = None
    if world_size > 1:
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        if not dist.is_initialized():
            set_collective_timeout(timeout_s)
            dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    return World(rank, world_size, local_rank, dev, backend)


#: with expert parallelism, DP splits into expert-data-parallel x expert-parallel ranks ("dp" is their flattening)
EP_MESH_DIMS = ("pp", "edp", "ep", "cp", "tp")


def build_mesh(world: World, parallel: ParallelDims):
    """A DeviceMesh named ("pp", "dp", "cp", "tp") over the world, or None for one process.

    With expert parallelism (``ep`` > 1) the mesh is ("pp", "edp", "ep", "cp", "tp"), carving EP
    out of DP as NxD does (EP peers are adjacent DP ranks), and "dp" is the flattened ("edp", "ep").
    """
    if not world.is_distributed:
        return None
    from torch.distributed.device_mesh import init_device_mesh

    sizes = {"pp": parallel.pp, "dp": parallel.dp, "cp": parallel.cp, "tp": parallel.tp}
    if parallel.world_size != world.world_size:
        raise ValueError(
            f"layout pp({parallel.pp}) x dp({parallel.dp}) x cp({parallel.cp}) x tp({parallel.tp}) = "
            f"{parallel.world_size} does not equal the world size {world.world_size}"
        )
    if parallel.ep > 1:
        sizes.update(edp=parallel.dp // parallel.ep, ep=parallel.ep)
        mesh = init_device_mesh(world.device.type, tuple(sizes[d] for d in EP_MESH_DIMS), mesh_dim_names=EP_MESH_DIMS)
        mesh["edp", "ep"]._flatten("dp")
        return mesh
    return init_device_mesh(world.device.type, tuple(sizes[d] for d in MESH_DIMS), mesh_dim_names=MESH_DIMS)


def dp_leader_ranks(mesh) -> list[int]:
    """Global ranks whose data-parallel index is 0 (one per model-parallel position)."""
    names = list(mesh.mesh_dim_names)
    ranks = mesh.mesh
    for dim in ("dp", "edp", "ep"):
        if dim in names:
            ranks = ranks.select(names.index(dim), 0)
            names.remove(dim)
    return sorted(ranks.flatten().tolist())


def shutdown(world: World) -> None:
    """Leave the process group cleanly."""
    if world.is_distributed and dist.is_initialized():
        leave_process_group()


def leave_process_group() -> None:
    """Destroy the default process group, then let gloo's worker threads finish their clean-up.

    A gloo worker drops its last reference to a finished collective (and so to its tensors) just
    after the collective completes, and that needs the GIL. If the interpreter is finalizing by
    then, the thread is stopped inside a C++ destructor and the process aborts ("terminate called
    without an active exception", SIGABRT) although the work was done. Sleeping releases the GIL
    so those threads finish while the interpreter is alive.
    """
    dist.destroy_process_group()
    time.sleep(0.1)
