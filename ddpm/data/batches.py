"""The order of training batches as a pure function of the training step: exact resume.

Lightning restores weights, optimizer and loop counters from a checkpoint but not where in
the shuffled epoch a run stopped. ``StepBatchSampler`` derives it instead: the data epoch
``e`` is a permutation seeded by ``(seed, e)``, split across ranks like
``DistributedSampler``, and every new iterator starts at the batch the trainer's step
counter points to. A run resumed at step N therefore sees exactly the batches the
uninterrupted run saw from step N on, mid-epoch included.

For sharded data (``groups``: the chunk of every item) the permutation is chunk-local, as
streaming loaders order their reads: the chunks in a random order, the items shuffled
within windows of ``window`` consecutive chunks, and each rank a contiguous block of the
epoch, so a rank reads its own few chunks at a time instead of every chunk for every batch.
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
        groups: torch.Tensor | None = None,
        window: int = 8,
    ) -> None:
        if num_items < 1 or batch_size < 1:
            raise ValueError(f"need items ({num_items}) and a batch size ({batch_size}) >= 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self.position, self.rank, self.world_size = position, rank, world_size
        if groups is not None and groups.shape != (num_items,):
            raise ValueError(f"groups has shape {tuple(groups.shape)}, not ({num_items},)")
        self.groups, self.window = groups, window
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
        if self.groups is None:
            order = torch.cat([order, order[: total - self.num_items]])  # [per_rank * world]
            return order[self.rank :: self.world_size].tolist()
        num_chunks = int(self.groups.max()) + 1
        place = torch.empty(num_chunks, dtype=torch.long)  # each chunk's place this epoch
        place[torch.randperm(num_chunks, generator=gen)] = torch.arange(num_chunks)
        window = place[self.groups] // self.window  # [N]: the window each item falls in
        # sort by window, then by the random rank of the item: random within a window
        key = window * self.num_items + torch.argsort(order)
        order = torch.argsort(key)
        order = torch.cat([order, order[: total - self.num_items]])  # [per_rank * world]
        start = self.rank * self.per_rank
        return order[start : start + self.per_rank].tolist()  # a contiguous block

    def __iter__(self) -> Iterator[list[int]]:
        consumed = int(self.position())
        epoch, skip = divmod(consumed, self.batches_per_epoch)
        items = self.epoch_indices(epoch)
        for b in range(skip, self.batches_per_epoch):
            yield items[b * self.batch_size : (b + 1) * self.batch_size]
