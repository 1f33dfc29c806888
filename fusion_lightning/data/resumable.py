"""An epoch-seeded shuffle, so that a train loader resumes mid-epoch at the same batch, in the same order.

Train loaders are torchdata's `StatefulDataLoader`: Lightning stores its `state_dict()` (how far the
current pass got) in every checkpoint and, on a mid-epoch resume, loads it back before iterating,
and the loader then skips the sampler's first indices without fetching their batches. That
reproduces the position only if the order is a function of the epoch, not of how many passes a
loader object has made: `EpochRandomSampler` reseeds its own generator in `set_epoch` (Lightning
calls it before every epoch, also after a resume), so it never draws from the global RNG either.
"""

from __future__ import annotations

from collections.abc import Sized

import torch
from torch.utils.data import RandomSampler


class EpochRandomSampler(RandomSampler):
    """A shuffled order that depends on (seed, epoch) only. Under DDP, Lightning swaps it for a seeded
    DistributedSampler (it is a RandomSampler), which is a function of the epoch as well."""

    def __init__(self, data_source: Sized, seed: int = 0) -> None:
        super().__init__(data_source, generator=torch.Generator())
        self.seed = int(seed)
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.generator.manual_seed(self.seed + int(epoch))
