"""Batches for one split: resident on the device (no DataLoader), or a worker DataLoader.

Both paths draw the epoch's order from the same seeded permutation (seed, epoch), so a run's
data order does not depend on the path and an epoch can be replayed exactly on resume.

Under data parallelism (a `Shard` other than the whole) a training step is one global batch of
`batch_size × processes` samples of that permutation, and process r reads the r-th block of it:
with the same global batch, N processes see exactly what one process sees. Evaluation splits are
cut into contiguous shards, so every sample is counted once (no padding duplicates). On XLA a
short last evaluation batch is padded to the full shape (one compiled graph for all batches) and
`real_rows(i)` says how many of its rows count.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from dltrain.data.base import ArraySplit, Split
from dltrain.errors import UserError
from dltrain.system.host import usable_cores

# On an accelerator, a split is kept resident when it takes at most this share of free memory.
RESIDENT_MEMORY_SHARE = 0.4


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The order of an epoch's samples: a CPU permutation seeded by (seed, epoch)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=generator)


@dataclass(frozen=True)
class Shard:
    """The part of the data one process reads: block `rank` of `count` (one process: all)."""

    rank: int = 0
    count: int = 1
    per_node: int = 1  # processes on this machine, which share its cores

    def bounds(self, n: int) -> tuple[int, int]:
        """This process's contiguous rows of an n-row split (shard sizes differ by at most 1)."""
        return self.rank * n // self.count, (self.rank + 1) * n // self.count


WHOLE = Shard()


class _Plan:
    """Which rows batch i holds for this process; both data paths follow it.

    Shuffled (training): batch i is this process's block of global batch i of the epoch's
    permutation. In order (evaluation): batch i of this process's contiguous shard.
    """

    def __init__(self, n: int, batch_size: int, shuffle: bool, drop_last: bool, shard: Shard):
        self.batch_size, self.shuffle = batch_size, shuffle
        if shuffle:
            self.first, self.rows = 0, n
            self.stride, self.offset = batch_size * shard.count, shard.rank * batch_size
        else:
            self.first, last = shard.bounds(n)
            self.rows, self.stride, self.offset = last - self.first, batch_size, 0
        self.length = _num_batches(self.rows, self.stride, drop_last)

    def span(self, i: int) -> tuple[int, int]:
        """Batch i's positions in the epoch's permutation (shuffled) or in the split (in order)."""
        start = i * self.stride + self.offset
        end = min(start + self.batch_size, self.rows)
        return self.first + start, self.first + end

    def real_rows(self, i: int) -> int:
        start, end = self.span(i)
        return end - start

    def order(self, n: int, seed: int, epoch: int) -> torch.Tensor | None:
        return epoch_permutation(n, seed, epoch) if self.shuffle else None

    def rows_of_epoch(self, order: torch.Tensor | None, start: int) -> list[int]:
        """Every row this process reads in the epoch, batch after batch, from batch `start`."""
        spans = [self.span(i) for i in range(start, self.length)]
        if order is None:
            return [row for a, b in spans for row in range(a, b)]
        return torch.cat([order[a:b] for a, b in spans] or [order[:0]]).tolist()


class ResidentBatches:
    """The whole split lives on the device; a batch is an on-device gather. No DataLoader."""

    path = "resident"

    def __init__(
        self,
        split: ArraySplit,
        batch_size: int,
        device: torch.device,
        shuffle: bool,
        drop_last: bool,
        seed: int,
        shard: Shard = WHOLE,
        pad_last: bool = False,
    ):
        self.x = split.x.to(device)
        self.y = split.y.to(device)
        self.plan = _Plan(len(self.y), batch_size, shuffle, drop_last, shard)
        self.batch_size, self.seed, self.pad_last = batch_size, seed, pad_last
        self.device = device

    def __len__(self) -> int:
        return self.plan.length

    @property
    def num_samples(self) -> int:
        """Rows of the whole split (all processes together)."""
        return len(self.y)

    def real_rows(self, i: int) -> int:
        """How many rows of batch i are data (fewer than its length when padded)."""
        return self.plan.real_rows(i)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield the epoch's batches in its seeded order, from batch `start` (for resume)."""
        plan = self.plan
        if self.device.type == "xla":
            yield from self._lazy_epoch(epoch, start)
            return
        if not plan.shuffle:
            for i in range(start, len(self)):
                a, b = plan.span(i)
                if self.pad_last and b - a < self.batch_size:
                    index = _padded_range(a, b, self.batch_size).to(self.device)
                    yield self.x[index], self.y[index]
                else:  # contiguous slices are views: no copy at all
                    yield self.x[a:b], self.y[a:b]
            return
        order = plan.order(len(self.y), self.seed, epoch).to(self.device, non_blocking=True)
        for i in range(start, len(self)):
            a, b = plan.span(i)
            index = order[a:b]
            # index_select, not x[index]: the same gather without Python's indexing rules,
            # ~10 µs a batch that show on millisecond steps
            yield self.x.index_select(0, index), self.y.index_select(0, index)

    def _lazy_epoch(self, epoch: int, start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # On XLA a slice position is a constant of the graph: slicing on the device would make
        # every batch a new graph (a compile each). Each batch's row numbers are sent as data
        # instead, so all batches share one graph.
        plan = self.plan
        order = plan.order(len(self.y), self.seed, epoch)
        for i in range(start, len(self)):
            a, b = plan.span(i)
            if order is not None:
                index = order[a:b]
            else:
                index = _padded_range(a, b, self.batch_size if self.pad_last else b - a)
            index = index.to(self.device)
            yield self.x[index], self.y[index]


def _padded_range(start: int, end: int, rows: int) -> torch.Tensor:
    """start..end-1, then the last row repeated up to `rows` (one static batch shape)."""
    return torch.arange(start, start + rows).clamp_(max=end - 1)


class EpochSampler(DistributedSampler):
    """torch's DistributedSampler drawing dltrain's order, so both data paths agree.

    Stock DistributedSampler deals rows round-robin and pads the last round with repeats; this
    one gives each process its block of every global batch (training) or a contiguous shard
    (evaluation), repeats nothing, and can start mid-epoch for an exact resume. `set_epoch`
    picks the epoch's permutation as usual.
    """

    def __init__(self, dataset, plan: _Plan, shard: Shard, seed: int):
        super().__init__(
            dataset, num_replicas=shard.count, rank=shard.rank, shuffle=plan.shuffle, seed=seed
        )
        self.plan, self.start = plan, 0

    def __iter__(self) -> Iterator[int]:
        order = self.plan.order(len(self.dataset), self.seed, self.epoch)
        return iter(self.plan.rows_of_epoch(order, self.start))

    def __len__(self) -> int:
        return sum(self.plan.real_rows(i) for i in range(self.start, self.plan.length))


class _Rows(Dataset):
    """An ArraySplit seen as a map-style dataset (for the worker path)."""

    def __init__(self, split: ArraySplit):
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int):
        return self.split.x[i], self.split.y[i]


class WorkerBatches:
    """A DataLoader with worker processes, pinned memory and non-blocking copies."""

    def __init__(
        self,
        split: Split,
        batch_size: int,
        device: torch.device,
        shuffle: bool,
        drop_last: bool,
        seed: int,
        num_workers: int | None,
        shard: Shard = WHOLE,
        pad_last: bool = False,
    ):
        workers = default_workers(shard.per_node) if num_workers is None else num_workers
        self.path = f"workers ({workers})"
        dataset = _Rows(split) if isinstance(split, ArraySplit) else split
        self.plan = _Plan(len(split), batch_size, shuffle, drop_last, shard)
        self.sampler = EpochSampler(dataset, self.plan, shard, seed)
        self.loader = DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=self.sampler,
            drop_last=False,  # the plan already holds whole batches only, when it drops
            num_workers=workers,
            pin_memory=device.type == "cuda",
            persistent_workers=workers > 0,
            prefetch_factor=4 if workers > 0 else None,
            # Without its own generator, every new iterator draws the workers' base seed from
            # torch's global RNG: that shifts dropout/augmentation randomness, differently on a
            # resume (persistent workers draw only on their first epoch) and unlike the resident
            # path. With it, the global RNG is the model's alone.
            generator=torch.Generator().manual_seed(seed),
        )
        self.batch_size, self.pad_last = batch_size, pad_last
        self.device = device
        self.num_samples = len(split)  # the whole split (all processes together)

    def __len__(self) -> int:
        # Whole epochs, whatever batch a resumed epoch starts from.
        return self.plan.length

    def real_rows(self, i: int) -> int:
        """How many rows of batch i are data (fewer than its length when padded)."""
        return self.plan.real_rows(i)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield the epoch's batches from batch `start`, copied to the device without blocking."""
        self.sampler.set_epoch(epoch)
        self.sampler.start = start
        for x, y in self.loader:
            if self.pad_last and len(y) < self.batch_size:
                x, y = _repeat_last_row(x, self.batch_size), _repeat_last_row(y, self.batch_size)
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)


def _repeat_last_row(t: torch.Tensor, rows: int) -> torch.Tensor:
    return torch.cat([t, t[-1:].expand(rows - len(t), *t.shape[1:])])


Batches = ResidentBatches | WorkerBatches


def make_batches(
    split: Split,
    batch_size: int,
    device: torch.device,
    *,
    loader: str,
    shuffle: bool,
    drop_last: bool,
    seed: int,
    num_workers: int | None = None,
    shard: Shard = WHOLE,
    pad_last: bool = False,
) -> Batches:
    """Choose the data path for a split (`auto`: resident when it fits) and build it."""
    resident = loader == "resident" or (loader == "auto" and fits_on_device(split, device))
    if resident:
        if not isinstance(split, ArraySplit):
            raise UserError(
                "data.loader: resident needs a dataset held in memory, but this one is decoded "
                "from files on demand; use data.loader: auto or workers."
            )
        return ResidentBatches(split, batch_size, device, shuffle, drop_last, seed, shard, pad_last)
    return WorkerBatches(
        split, batch_size, device, shuffle, drop_last, seed, num_workers, shard, pad_last
    )


def fits_on_device(split: Split, device: torch.device) -> bool:
    """In-memory splits stay resident on the CPU; on an accelerator, when they fit the budget."""
    if not isinstance(split, ArraySplit):
        return False
    if device.type != "cuda":
        return True
    size = split.x.numel() * split.x.element_size() + split.y.numel() * 8
    free, _ = torch.cuda.mem_get_info(device)
    return size <= RESIDENT_MEMORY_SHARE * free


def default_workers(processes_per_node: int = 1) -> int:
    """Worker processes for one DataLoader: this process's share of the usable cores (the node's
    cores over its training processes) less one for the process itself."""
    return max(0, min(8, usable_cores() // processes_per_node - 1))


def _num_batches(n: int, batch_size: int, drop_last: bool) -> int:
    return n // batch_size if drop_last else math.ceil(n / batch_size)
