"""Multi-scale training by batch: one random scale per batch, applied to the whole batch in the collate function."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import default_collate, get_worker_info

from lomix_lightning.errors import LomixUserError

__all__ = ["MultiScaleCollate", "scaled_size"]


def scaled_size(img_size: int, scale: float, multiple: int = 32) -> int:
    """``round(img_size * scale / multiple) * multiple`` (round half up, at least ``multiple``), as in PraNet.

    PraNet uses Python's ``round`` (half to even); the two differ only on exact ties such as 2.5, which the paper
    settings (352 and 256 with scales 0.75/1/1.25) never produce.

    Args:
        img_size: Base side length.
        scale: Scale factor (> 0).
        multiple: The size is rounded to a multiple of this.

    Returns:
        The side length for this scale.

    Example:
        >>> [scaled_size(352, s) for s in (0.75, 1.0, 1.25)], [scaled_size(256, s) for s in (0.75, 1.0, 1.25)]
        ([256, 352, 448], [192, 256, 320])
    """
    return max(multiple, math.floor(img_size * scale / multiple + 0.5) * multiple)


class MultiScaleCollate:
    """Collate a batch, then resize all of it to one randomly chosen scale.

    Images are resized bilinearly (``align_corners=False``), masks with nearest neighbour, so masks keep their
    integer ids. The scale is drawn from a generator seeded with ``seed`` in the main process and with
    ``(seed, torch worker seed)`` inside a DataLoader worker, so the sequence is reproducible given the loader's
    seed and differs between workers.

    Args:
        img_size: Base side length (the dataset's output size).
        scales: Candidate scales, each > 0; drawn uniformly.
        seed: Seed of the scale stream.
        multiple: Sizes are rounded to a multiple of this.

    Raises:
        ValueError: If ``scales`` is empty or holds a non-positive value.

    Example:
        >>> collate = MultiScaleCollate(64, scales=(0.5, 1.0), seed=0)
        >>> batch = collate([{"image": torch.zeros(3, 64, 64), "mask": torch.zeros(64, 64, dtype=torch.long)}] * 2)
        >>> batch["image"].shape[-1] in (32, 64), batch["mask"].dtype
        (True, torch.int64)
    """

    def __init__(self, img_size: int, scales: Sequence[float], seed: int = 0, multiple: int = 32) -> None:
        scales = tuple(float(s) for s in scales)
        if not scales or any(s <= 0 for s in scales):
            raise LomixUserError(f"`multiscale` must be a non-empty list of positive scales, got {scales!r}")
        self.sizes = tuple(scaled_size(img_size, s, multiple) for s in scales)
        self.seed = int(seed)
        self._stream: int | None = None
        self._rng = np.random.default_rng(self.seed)

    def _generator(self) -> np.random.Generator:
        info = get_worker_info()
        stream = None if info is None else int(info.seed)
        if stream != self._stream:
            self._stream = stream
            self._rng = np.random.default_rng(self.seed if stream is None else (self.seed, stream))
        return self._rng

    def __call__(self, samples: list[dict]) -> dict:
        """Collate ``samples`` and resize ``image`` (B, C, H, W) and ``mask`` (B, H, W) to the drawn size."""
        batch = default_collate(samples)
        size = self.sizes[int(self._generator().integers(len(self.sizes)))]
        if batch["image"].shape[-2:] != (size, size):
            batch["image"] = F.interpolate(batch["image"], size=(size, size), mode="bilinear", align_corners=False)
            mask = batch["mask"][:, None].float()  # (B, H, W) -> (B, 1, H, W)
            batch["mask"] = F.interpolate(mask, size=(size, size), mode="nearest-exact")[:, 0].to(torch.int64)
        return batch
