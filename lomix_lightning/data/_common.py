"""Small helpers shared by the data modules: argument checks, list files, loaders and worker seeding."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from lomix_lightning.errors import LomixUserError

__all__ = [
    "check_fraction",
    "check_int",
    "check_label_range",
    "make_loader",
    "read_list_file",
    "unique_in_order",
]


def check_int(name: str, value: int, minimum: int) -> None:
    """Raise ``ValueError`` unless ``value`` is an ``int`` (not ``bool``) that is at least ``minimum``.

    Args:
        name: Argument name used in the message.
        value: The value to check.
        minimum: Smallest allowed value.

    Raises:
        ValueError: If ``value`` is not an integer ``>= minimum``.

    Example:
        >>> check_int("batch_size", 4, minimum=1)
    """
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise LomixUserError(f"`{name}` must be an integer >= {minimum}, got {value!r}")


def check_fraction(name: str, value: float) -> None:
    """Raise ``ValueError`` unless ``0 < value <= 1``.

    Args:
        name: Argument name used in the message.
        value: The value to check.

    Raises:
        ValueError: If ``value`` is outside ``(0, 1]``.

    Example:
        >>> check_fraction("train_fraction", 0.05)
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < float(value) <= 1.0:
        raise LomixUserError(f"`{name}` must be a number in (0, 1], got {value!r}")


def read_list_file(path: str | Path) -> list[str]:
    r"""Read a list file: one entry per line, blank lines and surrounding whitespace ignored.

    Args:
        path: Text file path.

    Returns:
        The non-empty stripped lines, in file order.

    Raises:
        FileNotFoundError: If the file does not exist (the message names it).
        ValueError: If the file has no entries.

    Example:
        >>> import tempfile, os
        >>> with tempfile.TemporaryDirectory() as d:
        ...     p = os.path.join(d, "train.txt")
        ...     _ = open(p, "w").write("case0005_slice000\n\ncase0005_slice001\n")
        ...     read_list_file(p)
        ['case0005_slice000', 'case0005_slice001']
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"list file not found: {path}")
    entries = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not entries:
        raise LomixUserError(f"list file is empty: {path}")
    return entries


def check_label_range(label: np.ndarray, num_classes: int, source: str | Path) -> None:
    """Raise ``ValueError`` naming ``source`` if ``label`` holds ids outside ``[0, num_classes)`` or non-integers.

    Args:
        label: Label map (any shape, any numeric dtype).
        num_classes: Number of classes including background.
        source: File (or entry) name used in the message.

    Raises:
        ValueError: If a label id is negative, ``>= num_classes`` or not integral.

    Example:
        >>> check_label_range(np.array([[0, 1], [2, 0]]), 3, "x.npz")
    """
    if label.size == 0:
        return
    lo, hi = float(label.min()), float(label.max())
    if lo < 0 or hi >= num_classes:
        raise LomixUserError(f"{source}: label ids must lie in [0, {num_classes - 1}], found range [{lo:g}, {hi:g}]")
    if not np.issubdtype(label.dtype, np.integer) and not np.array_equal(label, np.round(label)):
        raise LomixUserError(f"{source}: label map contains non-integer values")


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


def unique_in_order(values: Sequence[str]) -> list[str]:
    """Return the distinct values in first-seen order.

    Args:
        values: Strings, possibly repeated.

    Returns:
        The distinct strings, in the order they first appear.

    Example:
        >>> unique_in_order(["b", "a", "b"])
        ['b', 'a']
    """
    return list(dict.fromkeys(values))
