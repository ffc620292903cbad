"""A deterministic, resumable, data-parallel-aware sampler of micro-batches of dataset indices.

One global stream of sample indices is fixed by the seed alone: epoch ``e`` is a permutation of
the dataset seeded with ``seed + e`` (the identity without shuffling), cut into global batches of
``global_batch_size``. Data-parallel rank ``r`` of ``dp_size`` takes the ``r``-th contiguous slice
of every global batch and yields it as successive micro-batches. Global batch ``g`` is therefore
the same set of samples whatever ``dp_size`` is, and a run resumed at ``consumed_samples`` (a
global count) continues the stream exactly where it stopped.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from nxdt.errors import NxdtError


class DistributedBatchSampler:
    """Micro-batches of indices for one DP rank; usable as a DataLoader ``batch_sampler``.

    Each ``iter()`` runs from ``consumed_samples`` to the end of that epoch, so the next
    ``iter()`` starts the next epoch. ``drop_last`` drops the final incomplete global batch of an
    epoch; without it that batch is filled up with samples from the start of the epoch's order,
    so every rank always gets full micro-batches (and collectives never wait on an idle rank).
    """

    def __init__(
        self,
        num_samples: int,
        micro_batch_size: int,
        dp_rank: int,
        dp_size: int,
        global_batch_size: int,
        seed: int = 1234,
        shuffle: bool = True,
        consumed_samples: int = 0,
        drop_last: bool = True,
    ) -> None:
        if not 0 <= dp_rank < dp_size:
            raise NxdtError(f"dp_rank {dp_rank} is outside 0..{dp_size - 1}")
        if micro_batch_size < 1 or global_batch_size % (micro_batch_size * dp_size):
            raise NxdtError(
                f"global_batch_size {global_batch_size} must be a multiple of micro_batch_size "
                f"{micro_batch_size} x data-parallel size {dp_size}"
            )
        if num_samples < 1 or (drop_last and num_samples < global_batch_size):
            raise NxdtError(
                f"the dataset has {num_samples} samples, fewer than one global batch of {global_batch_size}"
            )
        self.num_samples, self.micro_batch_size = num_samples, micro_batch_size
        self.dp_rank, self.dp_size, self.global_batch_size = dp_rank, dp_size, global_batch_size
        self.seed, self.shuffle, self.drop_last = seed, shuffle, drop_last
        self.consumed_samples = consumed_samples
        batches = num_samples // global_batch_size if drop_last else -(-num_samples // global_batch_size)
        #: Samples of the global stream per epoch (whole global batches only).
        self.samples_per_epoch = batches * global_batch_size

    @property
    def epoch(self) -> int:
        """The epoch ``consumed_samples`` falls in."""
        return self.consumed_samples // self.samples_per_epoch

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The global stream of one epoch: ``samples_per_epoch`` sample indices."""
        if self.shuffle:
            order = np.random.default_rng(self.seed + epoch).permutation(self.num_samples)
        else:
            order = np.arange(self.num_samples)
        return np.resize(order, self.samples_per_epoch)  # wraps around to fill the last global batch

    def __iter__(self) -> Iterator[list[int]]:
        epoch, offset = divmod(self.consumed_samples, self.samples_per_epoch)
        order = self.epoch_order(epoch)
        share = self.global_batch_size // self.dp_size
        for start in range(
            offset, self.samples_per_epoch - self.global_batch_size + 1, self.global_batch_size
        ):
            mine = order[start : start + self.global_batch_size][
                self.dp_rank * share : (self.dp_rank + 1) * share
            ]
            for first in range(0, share, self.micro_batch_size):
                if first + self.micro_batch_size == share:
                    # Counted as consumed once its last micro-batch is handed out.
                    self.consumed_samples = epoch * self.samples_per_epoch + start + self.global_batch_size
                yield mine[first : first + self.micro_batch_size].tolist()
        # A resume offset that is not a whole number of global batches leaves a stub: skip it.
        self.consumed_samples = max(self.consumed_samples, (epoch + 1) * self.samples_per_epoch)

    def __len__(self) -> int:
        """Micro-batches the next ``iter()`` yields on this rank."""
        offset = self.consumed_samples % self.samples_per_epoch
        global_batches = (self.samples_per_epoch - offset) // self.global_batch_size
        return global_batches * self.global_batch_size // self.dp_size // self.micro_batch_size

    def state_dict(self) -> dict[str, Any]:
        """What resuming needs; a trainer that prefetches should store its own count of consumed samples."""
        return {"consumed_samples": self.consumed_samples, "seed": self.seed, "epoch": self.epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at ``state["consumed_samples"]`` (the seed is restored too when present)."""
        self.consumed_samples = int(state["consumed_samples"])
        self.seed = int(state.get("seed", self.seed))
