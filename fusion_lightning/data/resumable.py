"""Data loaders that resume mid-epoch at the same batch, in the same order, as an uninterrupted run.

Lightning stores `state_dict()` of every stateful train loader in its checkpoints and, when a run
restarts mid-epoch, calls `load_state_dict()` before iterating again. `ResumableDataLoader` records
how many batches the current pass has yielded and, after a restore, skips that many. That only
reproduces the position if the order is a function of the epoch, not of how many passes a loader
object has made: `EpochRandomSampler` reseeds its own generator in `set_epoch` (Lightning calls it
before every epoch, also after a resume), so it never draws from the global RNG either.
"""

from __future__ import annotations

from collections.abc import Iterator, Sized
from typing import Any

import torch
from torch.utils.data import DataLoader, RandomSampler


class EpochRandomSampler(RandomSampler):
    """A shuffled order that depends on (seed, epoch) only. Under DDP, Lightning swaps it for a seeded
    DistributedSampler (it is a RandomSampler), which is a function of the epoch as well."""

    def __init__(self, data_source: Sized, seed: int = 0) -> None:
        super().__init__(data_source, generator=torch.Generator())
        self.seed = int(seed)
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.generator.manual_seed(self.seed + int(epoch))


class ResumableDataLoader(DataLoader):
    """A DataLoader whose position within the current pass is part of the checkpoint."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._yielded = 0
        self._skip = 0

    def state_dict(self) -> dict[str, int]:
        return {"batches_yielded": self._yielded}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._skip = int(state.get("batches_yielded", 0))

    def __iter__(self) -> Iterator[Any]:
        self._yielded = 0
        return self._batches(super().__iter__())

    def _batches(self, it: Iterator[Any]) -> Iterator[Any]:
        # the skip is read at the first batch, not at iter(): Lightning may create the iterator before the
        # restored state arrives (ResumeState hands it over at on_train_start)
        skip, self._skip = self._skip, 0
        # skipped batches are fetched and dropped: exact for any sampler, and cheap for in-memory datasets
        for _ in range(skip):
            try:
                next(it)
            except StopIteration:
                return
            self._yielded += 1
        for batch in it:
            self._yielded += 1
            yield batch
