"""A shuffling batch sampler whose position can be saved and restored mid-epoch."""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
from torch.utils.data import Sampler


class ResumableBatchSampler(Sampler[list[int]]):
    """Batches of ``batch_size`` indices into ``range(n)``; epoch ``e`` uses a permutation seeded by ``(seed, e)``.

    The last incomplete batch is dropped. With ``num_replicas > 1``, rank ``r`` takes every ``num_replicas``-th batch
    starting at ``r``. :meth:`resume` makes the next pass over epoch ``e`` start after ``batches_done`` batches, so a
    run restored from a mid-epoch checkpoint sees exactly the batches an uninterrupted run would.
    """

    def __init__(self, n: int, batch_size: int, seed: int = 0, num_replicas: int = 1, rank: int = 0):
        self.n = n
        self.batch_size = batch_size
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0
        self._skip = 0

    def __len__(self) -> int:
        return (self.n // self.batch_size) // self.num_replicas

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self._skip = 0
        self.epoch = epoch

    def resume(self, epoch: int, batches_done: int) -> None:
        self.epoch = epoch
        self._skip = batches_done

    def __iter__(self) -> Iterator[list[int]]:
        seed = int(np.random.SeedSequence([self.seed, self.epoch]).generate_state(1)[0])
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(seed)).tolist()
        skip, self._skip = self._skip, 0
        for i in range(skip, len(self)):
            start = (i * self.num_replicas + self.rank) * self.batch_size
            yield order[start : start + self.batch_size]
