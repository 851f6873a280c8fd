"""Data loaders whose shuffle order and worker seeds depend only on a seed (and the epoch), so runs resume exactly."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

__all__ = ["EpochSeededSampler", "make_loader"]


class EpochSeededSampler(Sampler[int]):
    """A random order that depends only on ``(seed, epoch)``, so a resumed run sees the order a straight run sees.

    Lightning calls :meth:`set_epoch` at the start of every epoch (as for ``DistributedSampler``).

    Example:
        >>> sampler = EpochSeededSampler(5, seed=0)
        >>> first = list(sampler); sampler.set_epoch(1)
        >>> sorted(first) == list(range(5)) and list(sampler) != first
        True
    """

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order :meth:`__iter__` yields."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())

    def __len__(self) -> int:
        return self.size


def make_loader(
    dataset: Dataset,
    batch_size: int,
    num_workers: int,
    shuffle: bool,
    seed: int | None = None,
    collate_fn=None,
    drop_last: bool = False,
) -> DataLoader:
    """Build a ``DataLoader`` whose shuffling (and worker seeds) follow ``seed`` when given.

    Args:
        dataset: The dataset.
        batch_size: Samples per batch.
        num_workers: Worker processes (0 = main process).
        shuffle: Shuffle every epoch.
        seed: Seed for the loader's own ``torch.Generator``; the shuffle order and the base seed handed to workers
            (which albumentations uses to reseed its per-worker RNG) then depend only on it.
        collate_fn: Optional collate function.
        drop_last: Drop the last incomplete batch.

    Returns:
        The ``DataLoader``.

    Example:
        >>> loader = make_loader(list(range(5)), batch_size=2, num_workers=0, shuffle=True, seed=0)
        >>> sum(len(b) for b in loader)
        5
    """
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    sampler = EpochSeededSampler(len(dataset), seed) if shuffle and seed is not None else None
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle and sampler is None,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_fn,
        drop_last=drop_last,
        generator=generator,
        persistent_workers=num_workers > 0,
    )
