"""Weighted blends of datasets (Megatron's ``data_prefix`` weights, or any map-style datasets)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from nxdt.errors import NxdtError


class BlendedDataset(Dataset):
    """``num_samples`` items drawn from ``datasets`` in proportion to ``weights``.

    Draws are interleaved so that after any prefix of ``i`` items dataset ``d`` has supplied
    ``weights[d] * i`` of them to within one; which of its items dataset ``d`` supplies follows a
    permutation seeded by ``(seed, d, epoch)``, so a blend that uses part of a dataset samples it
    evenly and a blend that exhausts it reshuffles it.
    """

    def __init__(
        self, weights: Sequence[float], datasets: Sequence[Dataset], num_samples: int, seed: int = 1234
    ) -> None:
        if len(weights) != len(datasets) or not datasets:
            raise NxdtError(
                f"a blend needs one weight per dataset (got {len(weights)} weights, {len(datasets)} datasets)"
            )
        weights_array = np.asarray(weights, dtype=np.float64)
        if (weights_array < 0).any() or weights_array.sum() <= 0:
            raise NxdtError(f"blend weights must be non-negative with a positive sum, got {list(weights)}")
        self.weights = weights_array / weights_array.sum()
        self.datasets, self.num_samples = list(datasets), num_samples

        # Dataset d's k-th draw is due at item (k + 0.5) / weight: merging those due times in order
        # is the proportional interleave.
        due_times, owners, draw_numbers = [], [], []
        for d, weight in enumerate(self.weights):
            if weight == 0:
                continue
            draws = math.ceil(weight * num_samples) + 1
            due_times.append((np.arange(draws) + 0.5) / weight)
            owners.append(np.full(draws, d, dtype=np.int64))
            draw_numbers.append(np.arange(draws, dtype=np.int64))
        order = np.lexsort((np.concatenate(owners), np.concatenate(due_times)))[:num_samples]
        self.dataset_index = np.concatenate(owners)[order]
        draw_of_item = np.concatenate(draw_numbers)[order]

        self.sample_index = np.zeros(num_samples, dtype=np.int64)
        for d, dataset in enumerate(self.datasets):
            mine = self.dataset_index == d
            if not mine.any():
                continue
            size = len(dataset)  # type: ignore[arg-type]
            if size == 0:
                raise NxdtError(f"blend dataset {d} is empty")
            draws = draw_of_item[mine]
            epochs = int(draws.max()) // size + 1
            permutation = np.concatenate(
                [np.random.default_rng([seed, d, e]).permutation(size) for e in range(epochs)]
            )
            self.sample_index[mine] = permutation[draws]

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> Any:
        if not 0 <= index < self.num_samples:
            raise IndexError(index)
        return self.datasets[int(self.dataset_index[index])][int(self.sample_index[index])]
