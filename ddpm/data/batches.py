"""The order of training batches as a pure function of the training step: exact resume.

Lightning restores weights, optimizer and loop counters from a checkpoint but not where in
the shuffled epoch a run stopped. ``StepBatchSampler`` derives it instead: the data epoch
``e`` is a permutation seeded by ``(seed, e)``, split across ranks like
``DistributedSampler``, and every new iterator starts at the batch the trainer's step
counter points to. A run resumed at step N therefore sees exactly the batches the
uninterrupted run saw from step N on, mid-epoch included.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch
from torch.utils.data import Sampler


class StepBatchSampler(Sampler[list[int]]):
    """Batches of indices of this rank's share of a per-epoch permutation.

    ``position()`` returns how many batches this rank has consumed so far (the trainer's
    step times gradient accumulation); each ``__iter__`` yields the rest of the epoch
    that position falls in. ``len`` is always the full epoch, as Lightning expects.
    """

    def __init__(
        self,
        num_items: int,
        batch_size: int,
        seed: int,
        position: Callable[[], int] = lambda: 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = True,
    ) -> None:
        if num_items < 1 or batch_size < 1:
            raise ValueError(f"need items ({num_items}) and a batch size ({batch_size}) >= 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self.position, self.rank, self.world_size = position, rank, world_size
        # each rank gets ceil(n / world) items per epoch (the permutation is padded by
        # wrapping around, as DistributedSampler does)
        self.per_rank = math.ceil(num_items / world_size)
        self.drop_last = drop_last and self.per_rank >= batch_size
        per_epoch = self.per_rank / batch_size
        self.batches_per_epoch = int(per_epoch) if self.drop_last else math.ceil(per_epoch)

    def __len__(self) -> int:
        return self.batches_per_epoch

    def epoch_indices(self, epoch: int) -> list[int]:
        """This rank's items of data epoch ``epoch``, in order."""
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(self.num_items, generator=gen)
        total = self.per_rank * self.world_size
        order = torch.cat([order, order[: total - self.num_items]])  # pad: [per_rank * world]
        return order[self.rank :: self.world_size].tolist()

    def __iter__(self) -> Iterator[list[int]]:
        consumed = int(self.position())
        epoch, skip = divmod(consumed, self.batches_per_epoch)
        items = self.epoch_indices(epoch)
        for b in range(skip, self.batches_per_epoch):
            yield items[b * self.batch_size : (b + 1) * self.batch_size]
