"""Procedural 3-D shapes: a fast, deterministic, CPU-sized stand-in for a volumetric segmentation dataset.

Each non-background class is one *shape family* at its own scale:

====  ===========  =====================================================================
id    name         shape
====  ===========  =====================================================================
0     background   smooth sinusoidal texture plus white noise
1     blob         one large ellipsoid with a wavy surface (radii ~0.18-0.3 of the side)
2     tubes        1-3 thin straight tubes (radius ~1 voxel at 32^3)
3     dots         3-8 small spheres (radius ~1.5-2.5 voxels at 32^3)
====  ===========  =====================================================================

Shapes are painted large first, so tubes and dots stay visible on top of the blob. Sample ``i`` of a split is drawn
from ``numpy.random.default_rng((seed, split_id, i))``: it does not depend on the worker or the read order, and the
three splits use disjoint seed streams. Every item carries its voxel ``spacing`` (the same for all volumes), which
the test loop passes to HD95.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader

from lomix_lightning.data.components.loaders import make_loader
from lomix_lightning.data.components.seeded import SeededSamples
from lomix_lightning.data.components.validation import check_int
from lomix_lightning.errors import LomixUserError

__all__ = ["SyntheticVolumesDataModule", "SyntheticVolumesDataset", "make_volume_sample"]

VOLUME_CLASS_NAMES = ("background", "blob", "tubes", "dots")
_INTENSITY = {1: 0.7, 2: 1.0, 3: 0.45}


def _segment_distance2(points: np.ndarray, a: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Squared distance of ``(3, ...)`` points to the segment ``a -> a + d``."""
    diff = points - a[:, None, None, None]
    t = np.clip(np.tensordot(d, diff, axes=1) / (d @ d), 0.0, 1.0)  # (D, H, W)
    return ((diff - t[None] * d[:, None, None, None]) ** 2).sum(axis=0)


def _paint(class_id: int, rng: np.random.Generator, grid: np.ndarray, size: int) -> np.ndarray:
    """Boolean ``(size, size, size)`` mask of one shape family; ``grid`` is the ``(3, D, H, W)`` voxel grid."""
    scale = size / 32.0
    if class_id == 1:  # blob: an ellipsoid whose radius wobbles with the azimuth
        centre = rng.uniform(0.35, 0.65, size=3) * size
        radii = rng.uniform(0.18, 0.3, size=3) * size
        rel = grid - centre[:, None, None, None]
        theta = np.arctan2(rel[1], rel[2])
        wobble = 1.0 + 0.12 * np.sin(rng.integers(3, 6) * theta + rng.uniform(0, 2 * np.pi))
        return ((rel / radii[:, None, None, None]) ** 2).sum(axis=0) <= wobble**2
    if class_id == 2:  # thin tubes
        out = np.zeros(grid.shape[1:], dtype=bool)
        radius = 0.9 * max(scale, 1.0)
        for _ in range(rng.integers(1, 4)):
            a = rng.uniform(0.1, 0.9, size=3) * size
            direction = rng.normal(size=3)
            d = direction / np.linalg.norm(direction) * rng.uniform(0.4, 0.8) * size
            out |= _segment_distance2(grid, a, d) <= radius**2
        return out
    out = np.zeros(grid.shape[1:], dtype=bool)  # dots: small spheres
    for _ in range(rng.integers(3, 9)):
        centre = rng.uniform(0.08, 0.92, size=3) * size
        radius = rng.uniform(1.5, 2.5) * scale
        out |= ((grid - centre[:, None, None, None]) ** 2).sum(axis=0) <= radius**2
    return out


def make_volume_sample(rng: np.random.Generator, num_classes: int = 4, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Draw one volume and its label volume.

    Args:
        rng: The random generator (consumed).
        num_classes: Classes including background, 2 to 4.
        size: Side length in voxels (>= 16).

    Returns:
        ``(image, mask)``: float32 ``(1, size, size, size)`` and int64 ``(size, size, size)`` with ids in
        ``[0, num_classes)``.

    Example:
        >>> image, mask = make_volume_sample(np.random.default_rng(0), num_classes=4, size=16)
        >>> image.shape, image.dtype, mask.shape, sorted(np.unique(mask).tolist())
        ((1, 16, 16, 16), dtype('float32'), (16, 16, 16), [0, 1, 2, 3])
    """
    axis = np.arange(size, dtype=np.float32)
    grid = np.stack(np.meshgrid(axis, axis, axis, indexing="ij"))  # (3, D, H, W)
    mask = np.zeros((size,) * 3, dtype=np.int64)
    for class_id in range(1, num_classes):  # blob, tubes, dots: large first
        mask[_paint(class_id, rng, grid, size)] = class_id
    freqs = rng.uniform(0.5, 3.0, size=(3, 3)) * (2 * np.pi / size)  # three low-frequency waves
    phases = rng.uniform(0, 2 * np.pi, size=3)
    image = 0.2 + 0.05 * sum(np.sin(np.tensordot(freqs[k], grid, axes=1) + phases[k]) for k in range(3))
    for class_id in range(1, num_classes):
        image[mask == class_id] = _INTENSITY[class_id] * rng.uniform(0.9, 1.1)
    image = image + rng.normal(0.0, 0.06, size=image.shape)
    return image[None].astype(np.float32), mask


def _check_args(num_classes: int, size: int, seed: int, spacing: Sequence[float]) -> None:
    check_int("num_classes", num_classes, minimum=2)
    if num_classes > len(VOLUME_CLASS_NAMES):
        raise LomixUserError(f"`num_classes` must be 2 to {len(VOLUME_CLASS_NAMES)}, got {num_classes}")
    check_int("volume_size", size, minimum=16)
    check_int("seed", seed, minimum=0)
    if len(spacing) != 3 or not all(isinstance(s, (int, float)) and s > 0 for s in spacing):
        raise LomixUserError(f"`spacing` must be three positive numbers (D, H, W), got {spacing!r}")


class SyntheticVolumesDataset(SeededSamples):
    """Map-style dataset of :func:`make_volume_sample` draws; item ``i`` depends only on ``(seed, split, i)``.

    Args:
        num_samples: Dataset length.
        num_classes: Classes including background (2 to 4).
        size: Side length in voxels.
        seed: Base seed.
        split: Which seed stream to use.
        spacing: Voxel size ``(D, H, W)`` reported with every item.

    Example:
        >>> item = SyntheticVolumesDataset(2, size=16)[1]
        >>> item["image"].shape, item["mask"].shape, item["spacing"].tolist()
        (torch.Size([1, 16, 16, 16]), torch.Size([16, 16, 16]), [1.0, 1.0, 1.0])
    """

    def __init__(
        self,
        num_samples: int,
        num_classes: int = 4,
        size: int = 32,
        seed: int = 0,
        split: Literal["train", "val", "test"] = "train",
        spacing: Sequence[float] = (1.0, 1.0, 1.0),
    ) -> None:
        _check_args(num_classes, size, seed, spacing)
        super().__init__(num_samples, seed, split)
        self.num_classes, self.size = num_classes, size
        self.spacing = torch.tensor([float(s) for s in spacing])

    def sample(self, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        """One volume, its mask and the spacing (:func:`make_volume_sample`)."""
        image, mask = make_volume_sample(rng, self.num_classes, self.size)
        return {"image": torch.from_numpy(image), "mask": torch.from_numpy(mask), "spacing": self.spacing.clone()}


class SyntheticVolumesDataModule(pl.LightningDataModule):
    """Synthetic 3-D shapes (blobs, thin tubes, small dots) for CPU demos and tests of volumetric networks.

    Training and validation serve ``volume_size``-cubed volumes (the patches a 3-D network trains on); the test and
    predict loaders serve ``test_volume_size``-cubed whole volumes, one per batch, which the module scores with a
    sliding window when ``model.sliding_window`` is set.

    Args:
        num_classes: Classes including background (2 to 4).
        volume_size: Side of the training and validation volumes (>= 16; a multiple of the network's stride
            product).
        test_volume_size: Side of the test volumes (default ``volume_size``).
        num_train: Training volumes.
        num_val: Validation volumes.
        num_test: Test volumes.
        batch_size: Volumes per training/validation batch.
        spacing: Voxel size ``(D, H, W)`` (used by HD95).
        seed: Base seed; also seeds the training shuffle.
        num_workers: DataLoader workers.

    Example:
        >>> dm = SyntheticVolumesDataModule(volume_size=16, num_train=2, batch_size=2)
        >>> dm.in_channels, dm.class_names
        (1, ['background', 'blob', 'tubes', 'dots'])
        >>> batch = next(iter(dm.train_dataloader()))
        >>> batch["image"].shape, batch["mask"].shape
        (torch.Size([2, 1, 16, 16, 16]), torch.Size([2, 16, 16, 16]))
    """

    def __init__(
        self,
        num_classes: int = 4,
        volume_size: int = 32,
        test_volume_size: int | None = None,
        num_train: int = 32,
        num_val: int = 4,
        num_test: int = 2,
        batch_size: int = 2,
        spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        _check_args(num_classes, volume_size, seed, spacing)
        test_volume_size = volume_size if test_volume_size is None else test_volume_size
        check_int("test_volume_size", test_volume_size, minimum=16)
        for name, value in (("num_train", num_train), ("num_val", num_val), ("num_test", num_test)):
            check_int(name, value, minimum=1)
        check_int("batch_size", batch_size, minimum=1)
        check_int("num_workers", num_workers, minimum=0)
        self.save_hyperparameters()
        self.num_classes, self.in_channels, self.spacing = num_classes, 1, tuple(float(s) for s in spacing)
        self.volume_size, self.test_volume_size = volume_size, test_volume_size
        self.num_train, self.num_val, self.num_test = num_train, num_val, num_test
        self.batch_size, self.seed, self.num_workers = batch_size, seed, num_workers
        self.class_names = list(VOLUME_CLASS_NAMES[:num_classes])

    def _dataset(self, split: Literal["train", "val", "test"], n: int, size: int) -> SyntheticVolumesDataset:
        return SyntheticVolumesDataset(n, self.num_classes, size, self.seed, split, self.spacing)

    def train_dataloader(self) -> DataLoader:
        """Shuffled training loader (shuffle seeded by ``seed``)."""
        dataset = self._dataset("train", self.num_train, self.volume_size)
        return make_loader(dataset, self.batch_size, self.num_workers, shuffle=True, seed=self.seed)

    def val_dataloader(self) -> DataLoader:
        """Validation loader."""
        dataset = self._dataset("val", self.num_val, self.volume_size)
        return make_loader(dataset, self.batch_size, self.num_workers, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """Whole test volumes, one per batch."""
        dataset = self._dataset("test", self.num_test, self.test_volume_size)
        return make_loader(dataset, 1, self.num_workers, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        """The test volumes."""
        return self.test_dataloader()
