"""Procedural datasets whose item ``i`` depends only on ``(seed, split, i)``: the synthetic 2-D and 3-D data."""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from torch.utils.data import Dataset

from lomix_lightning.data.components.validation import check_int
from lomix_lightning.errors import LomixUserError

Split = Literal["train", "val", "test"]

SPLIT_IDS = {"train": 0, "val": 1, "test": 2}
"""The seed stream of each split."""


class SeededSamples(Dataset):
    """A fixed-length dataset; item ``i`` is :meth:`sample` drawn from the generator seeded by ``(seed, split, i)``.

    Subclasses implement :meth:`sample`; every item also gets its ``"name"`` (``"<split>_<index>"``).

    Args:
        num_samples: Dataset length.
        seed: Base seed.
        split: Which seed stream to use.

    Example:
        >>> class Draws(SeededSamples):
        ...     def sample(self, rng):
        ...         return {"value": float(rng.random())}
        >>> Draws(2)[1] == Draws(2)[1], Draws(2)[1]["name"]
        (True, 'train_00001')
    """

    def __init__(self, num_samples: int, seed: int = 0, split: Split = "train") -> None:
        check_int("num_samples", num_samples, minimum=1)
        if split not in SPLIT_IDS:
            raise LomixUserError(f"`split` must be one of {sorted(SPLIT_IDS)}, got {split!r}")
        self.num_samples, self.seed, self.split = num_samples, seed, split

    def sample(self, rng: np.random.Generator) -> dict[str, Any]:
        """One item's fields from its own generator."""
        raise NotImplementedError

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for a dataset of {self.num_samples} samples")
        item = self.sample(np.random.default_rng((self.seed, SPLIT_IDS[self.split], index)))
        return {**item, "name": f"{self.split}_{index:05d}"}
