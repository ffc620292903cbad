"""The devices a plan is judged against: memory per rank, peak FLOPs and link speeds (stated figures).

A *rank* is one training process: one GPU, or one NeuronCore on Trainium (NxD Training runs a
rank per NeuronCore, 32 on a trn1.32xlarge and 64 logical cores on a trn2.48xlarge). Memory is
what the device reports (nvidia-smi's total for GPUs; HBM per chip / cores per chip for Neuron).
The figures below are the ones ``nxdt plan`` prints; ``--device-memory`` overrides the memory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

GIB = 1 << 30


@dataclass(frozen=True)
class Device:
    """One kind of accelerator (or the CPU), per rank."""

    name: str
    memory_gib: float  # memory one rank may use, as the device reports it
    reserve_gib: float  # taken by the runtime outside the training allocator (CUDA context, NCCL/Neuron buffers)
    peak_tflops: float  # dense bf16 per rank
    intra_gbs: float  # GB/s per rank to the ranks of its node (NVLink / NeuronLink), one direction
    inter_gbs: float  # GB/s per rank to other nodes (InfiniBand / EFA), one direction
    ranks_per_node: int
    source: str  # where the figures come from

    @property
    def usable_bytes(self) -> int:
        """Memory left to the training process's tensors on one rank."""
        return int((self.memory_gib - self.reserve_gib) * GIB)

    def with_memory(self, gib: float) -> Device:
        """This device with ``gib`` GiB per rank (``--device-memory``)."""
        return replace(self, memory_gib=gib, source=f"{self.source}; memory overridden to {gib:g} GiB")


DEVICES: dict[str, Device] = {
    "h100": Device("h100", 79.6, 2.0, 989.0, 450.0, 50.0, 8,
                   "H100 SXM 80 GB: 81,559 MiB as nvidia-smi reports; 989 dense bf16 TFLOPS; NVLink4 450 GB/s, "
                   "8x400 Gb/s InfiniBand (50 GB/s per GPU)"),
    "h200": Device("h200", 140.4, 2.0, 989.0, 450.0, 50.0, 8,
                   "H200 SXM 141 GB: 143,771 MiB as nvidia-smi reports; 989 dense bf16 TFLOPS; NVLink4 450 GB/s, "
                   "8x400 Gb/s InfiniBand (50 GB/s per GPU)"),
    "a100": Device("a100", 80.0, 2.0, 312.0, 300.0, 25.0, 8,
                   "A100 SXM 80 GB: 81,920 MiB; 312 dense bf16 TFLOPS; NVLink3 300 GB/s, 8x200 Gb/s InfiniBand "
                   "(25 GB/s per GPU)"),
    "trn1": Device("trn1", 16.0, 0.5, 95.0, 96.0, 3.1, 32,
                   "trn1.32xlarge: 16 Trainium chips of 32 GB HBM and 2 NeuronCores each, one rank per core "
                   "(16 GiB); 190 bf16 TFLOPS per chip; NeuronLink, 800 Gb/s EFA per node"),
    "trn2": Device("trn2", 24.0, 0.5, 167.0, 160.0, 6.25, 64,
                   "trn2.48xlarge: 16 Trainium2 chips of 96 GB HBM and 4 logical NeuronCores each (LNC=2), one "
                   "rank per logical core (24 GiB); 667 dense bf16 TFLOPS per chip; 3.2 Tb/s EFA per node"),
    "cpu": Device("cpu", 0.0, 0.0, 0.1, 5.0, 1.0, 1,
                  "this machine's RAM shared by its ranks; 0.1 TFLOPS per rank is a nominal figure for ranking only"),
}


def device(name: str, memory_gib: float | None = None, ranks_per_node: int | None = None) -> Device:
    """The named device; ``cpu`` gets this machine's RAM divided among ``ranks_per_node`` ranks."""
    from nxdt.errors import ConfigError

    key = name.lower()
    if key not in DEVICES:
        raise ConfigError(f"--device {name!r}: one of {', '.join(DEVICES)}")
    dev = DEVICES[key]
    if key == "cpu":
        per_rank = machine_ram_bytes() / max(1, ranks_per_node or 1) / GIB
        dev = replace(dev, memory_gib=round(per_rank, 2), ranks_per_node=ranks_per_node or 1)
    if ranks_per_node:
        dev = replace(dev, ranks_per_node=ranks_per_node)
    return dev.with_memory(memory_gib) if memory_gib else dev


def machine_ram_bytes() -> int:
    """Total RAM of this machine (``/proc/meminfo`` MemTotal; sysconf elsewhere)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def local_device(ranks_per_node: int = 1) -> Device:
    """This machine's device kind: its GPU (a known kind, else H100 figures with the GPU's memory) or its CPU RAM."""
    import torch

    if not torch.cuda.is_available() or os.environ.get("NXDT_DEVICE", "").startswith("cpu"):
        return device("cpu", ranks_per_node=ranks_per_node)
    name = torch.cuda.get_device_name().lower()
    known = next((key for key in ("h200", "h100", "a100") if key in name), None)
    if known:
        return device(known, ranks_per_node=ranks_per_node)
    total = torch.cuda.mem_get_info()[1] / GIB
    return replace(DEVICES["h100"], name=name, ranks_per_node=ranks_per_node).with_memory(round(total, 1))
