"""Batches for one split: resident on the device (no DataLoader), or a worker DataLoader.

Both paths draw the epoch's order from the same seeded permutation (seed, epoch), so a run's
data order does not depend on the path and an epoch can be replayed exactly on resume.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from dltrain.data.base import ArraySplit, Split
from dltrain.errors import UserError

# On an accelerator, a split is kept resident when it takes at most this share of free memory.
RESIDENT_MEMORY_SHARE = 0.4


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The order of an epoch's samples: a CPU permutation seeded by (seed, epoch)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=generator)


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
    ):
        self.x = split.x.to(device)
        self.y = split.y.to(device)
        self.batch_size, self.shuffle, self.drop_last, self.seed = (
            batch_size,
            shuffle,
            drop_last,
            seed,
        )
        self.device = device

    def __len__(self) -> int:
        return _num_batches(len(self.y), self.batch_size, self.drop_last)

    @property
    def num_samples(self) -> int:
        return len(self.y)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield the epoch's batches in its seeded order, from batch `start` (for resume)."""
        if not self.shuffle:  # contiguous slices are views: no copy at all
            for i in range(start, len(self)):
                s = slice(i * self.batch_size, (i + 1) * self.batch_size)
                yield self.x[s], self.y[s]
            return
        order = epoch_permutation(len(self.y), self.seed, epoch).to(self.device, non_blocking=True)
        for i in range(start, len(self)):
            index = order[i * self.batch_size : (i + 1) * self.batch_size]
            yield self.x[index], self.y[index]


class _EpochSampler(Sampler[int]):
    """Sequential, or the seeded (seed, epoch) permutation shared with the resident path."""

    def __init__(self, n: int, shuffle: bool, seed: int):
        self.n, self.shuffle, self.seed, self.epoch, self.skip = n, shuffle, seed, 0, 0

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return iter(range(self.skip, self.n))
        return iter(epoch_permutation(self.n, self.seed, self.epoch)[self.skip :].tolist())

    def __len__(self) -> int:
        return self.n - self.skip


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
    ):
        workers = default_workers() if num_workers is None else num_workers
        self.path = f"workers ({workers})"
        self.sampler = _EpochSampler(len(split), shuffle, seed)
        dataset = _Rows(split) if isinstance(split, ArraySplit) else split
        self.loader = DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=self.sampler,
            drop_last=drop_last,
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
        self.device = device
        self.num_samples = len(split)

    def __len__(self) -> int:
        # Whole epochs, whatever batch a resumed epoch starts from.
        return _num_batches(self.num_samples, self.loader.batch_size, self.loader.drop_last)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield the epoch's batches from batch `start`, copied to the device without blocking."""
        self.sampler.epoch, self.sampler.skip = epoch, start * self.loader.batch_size
        for x, y in self.loader:
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)


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
) -> Batches:
    """Choose the data path for a split (`auto`: resident when it fits) and build it."""
    resident = loader == "resident" or (loader == "auto" and fits_on_device(split, device))
    if resident:
        if not isinstance(split, ArraySplit):
            raise UserError(
                "data.loader: resident needs a dataset held in memory, but this one is decoded "
                "from files on demand; use data.loader: auto or workers."
            )
        return ResidentBatches(split, batch_size, device, shuffle, drop_last, seed)
    return WorkerBatches(split, batch_size, device, shuffle, drop_last, seed, num_workers)


def fits_on_device(split: Split, device: torch.device) -> bool:
    """In-memory splits stay resident on the CPU; on an accelerator, when they fit the budget."""
    if not isinstance(split, ArraySplit):
        return False
    if device.type != "cuda":
        return True
    size = split.x.numel() * split.x.element_size() + split.y.numel() * 8
    free, _ = torch.cuda.mem_get_info(device)
    return size <= RESIDENT_MEMORY_SHARE * free


def default_workers() -> int:
    """Worker processes for the DataLoader: the usable cores less one for the main process."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(0, min(8, (cores or 1) - 1))


def _num_batches(n: int, batch_size: int, drop_last: bool) -> int:
    return n // batch_size if drop_last else math.ceil(n / batch_size)
