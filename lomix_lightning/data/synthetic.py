"""Procedural multi-scale shapes: a fast, deterministic stand-in for a segmentation dataset.

Each non-background class is one *shape family* at its own scale, so a multi-scale decoder has something to learn
at every stage:

====  ===========  ==================================================================
id    name         shape
====  ===========  ==================================================================
0     background   smooth sinusoidal texture plus white noise
1     blob         one large ellipse with a wavy border (radius ~0.2-0.3 of the side)
2     lines        1-3 thin straight lines (about 1 pixel wide at 64 px)
3     dots         3-8 small discs (radius ~2-3 pixels at 64 px)
4     box          one medium rotated rectangle
5     ring         one thin annulus
6+    the families above again, in the same order, with another intensity/colour
====  ===========  ==================================================================

Shapes are painted from the largest to the smallest, so small and thin structures stay visible on top of the blob.
Every class is painted in every image. Sample ``i`` of a split is drawn from
``numpy.random.default_rng((seed, split_id, i))``, so it does not depend on the worker or the read order, and the
three splits use disjoint seed streams.
"""

from __future__ import annotations

from typing import Literal

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader

from lomix_lightning.data.components.loaders import make_loader
from lomix_lightning.data.components.seeded import SeededSamples
from lomix_lightning.data.components.validation import check_int
from lomix_lightning.errors import LomixUserError

__all__ = ["SyntheticShapesDataModule", "SyntheticShapesDataset", "make_shapes_sample"]

_FAMILIES = ("blob", "lines", "dots", "box", "ring")
_PAINT_RANK = {"blob": 0, "box": 1, "ring": 2, "dots": 3, "lines": 4}  # large first, thin last
_PALETTE = ((0.95, 0.35, 0.45), (0.55, 0.55, 1.0), (1.0, 0.9, 0.3), (0.35, 0.95, 0.95), (0.4, 1.0, 0.4))


def _class_colour(class_id: int, in_channels: int) -> np.ndarray:
    """Fixed mean intensity (1 channel) or colour (3 channels) of a class; the same in every image."""
    if in_channels == 1:
        return np.array([0.55 + 0.45 * ((class_id * 0.618034) % 1.0)], dtype=np.float32)
    if class_id <= len(_PALETTE):
        return np.array(_PALETTE[class_id - 1], dtype=np.float32)
    rng = np.random.default_rng(1000 + class_id)
    return rng.uniform(0.35, 1.0, size=in_channels).astype(np.float32)


def _paint_family(family: str, rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, size: int) -> np.ndarray:
    """Boolean mask of one shape family on a ``(size, size)`` grid."""
    scale = size / 64.0
    if family == "blob":
        cy, cx = rng.uniform(0.3, 0.7, size=2) * size
        ry, rx = rng.uniform(0.18, 0.3, size=2) * size
        theta = np.arctan2(yy - cy, xx - cx)
        wobble = 1.0 + 0.12 * np.sin(rng.integers(3, 6) * theta + rng.uniform(0, 2 * np.pi))
        return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= wobble**2
    if family == "lines":
        out = np.zeros(yy.shape, dtype=bool)
        half_width = 0.6 * max(scale, 1.0)
        for _ in range(rng.integers(1, 4)):
            a = rng.uniform(0.05, 0.95, size=2) * size
            angle = rng.uniform(0, np.pi)
            length = rng.uniform(0.3, 0.8) * size
            d = np.array([np.sin(angle), np.cos(angle)]) * length
            # Distance from each pixel to the segment a -> a + d.
            t = np.clip(((yy - a[0]) * d[0] + (xx - a[1]) * d[1]) / (d @ d), 0.0, 1.0)
            out |= (yy - a[0] - t * d[0]) ** 2 + (xx - a[1] - t * d[1]) ** 2 <= half_width**2
        return out
    if family == "dots":
        n = int(rng.integers(3, 9))
        centres = rng.uniform(0.05, 0.95, size=(n, 2)) * size
        radii = rng.uniform(1.5, 3.0, size=n) * scale
        dist2 = (yy[None] - centres[:, 0, None, None]) ** 2 + (xx[None] - centres[:, 1, None, None]) ** 2
        return (dist2 <= radii[:, None, None] ** 2).any(axis=0)  # (n, H, W) -> (H, W)
    if family == "box":
        cy, cx = rng.uniform(0.2, 0.8, size=2) * size
        hy, hx = rng.uniform(0.05, 0.1, size=2) * size
        angle = rng.uniform(0, np.pi)
        u = (yy - cy) * np.cos(angle) + (xx - cx) * np.sin(angle)
        v = -(yy - cy) * np.sin(angle) + (xx - cx) * np.cos(angle)
        return (np.abs(u) <= hy) & (np.abs(v) <= hx)
    # ring
    cy, cx = rng.uniform(0.25, 0.75, size=2) * size
    radius = rng.uniform(0.1, 0.16) * size
    r = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)
    return np.abs(r - radius) <= 1.2 * max(scale, 1.0)


def make_shapes_sample(
    rng: np.random.Generator, num_classes: int = 4, in_channels: int = 1, image_size: int = 64
) -> tuple[np.ndarray, np.ndarray]:
    """Draw one image and its label map.

    Args:
        rng: The random generator (consumed).
        num_classes: Classes including background (>= 2).
        in_channels: 1 (grey) or 3 (colour).
        image_size: Side length in pixels (>= 16).

    Returns:
        ``(image, mask)``: float32 ``(in_channels, image_size, image_size)`` roughly in [0, 1.3], and int64
        ``(image_size, image_size)`` with ids in ``[0, num_classes)``.

    Example:
        >>> image, mask = make_shapes_sample(np.random.default_rng(0), num_classes=3, in_channels=1, image_size=32)
        >>> image.shape, image.dtype, mask.shape, sorted(np.unique(mask).tolist())
        ((1, 32, 32), dtype('float32'), (32, 32), [0, 1, 2])
    """
    size = image_size
    yy, xx = np.meshgrid(np.arange(size, dtype=np.float32), np.arange(size, dtype=np.float32), indexing="ij")
    mask = np.zeros((size, size), dtype=np.int64)
    families = {c: _FAMILIES[(c - 1) % len(_FAMILIES)] for c in range(1, num_classes)}
    for class_id in sorted(families, key=lambda c: (_PAINT_RANK[families[c]], c)):
        mask[_paint_family(families[class_id], rng, yy, xx, size)] = class_id
    # Background texture: a few random low-frequency sinusoids, per channel.
    freqs = rng.uniform(0.5, 4.0, size=(in_channels, 4, 2)) * (2 * np.pi / size)
    phases = rng.uniform(0, 2 * np.pi, size=(in_channels, 4, 1, 1))
    waves = np.sin(freqs[..., 0, None, None] * yy + freqs[..., 1, None, None] * xx + phases)  # (Cin, 4, H, W)
    image = 0.25 + 0.05 * waves.sum(axis=1)  # (Cin, H, W)
    for class_id in range(1, num_classes):
        region = mask == class_id
        colour = _class_colour(class_id, in_channels) * rng.uniform(0.9, 1.1)
        image[:, region] = colour[:, None]
    image = image + rng.normal(0.0, 0.06, size=image.shape)
    return image.astype(np.float32), mask


class SyntheticShapesDataset(SeededSamples):
    """Map-style dataset of :func:`make_shapes_sample` draws; item ``i`` depends only on ``(seed, split, i)``.

    Args:
        num_samples: Dataset length.
        num_classes: Classes including background.
        in_channels: 1 or 3.
        image_size: Side length.
        seed: Base seed.
        split: Which seed stream to use.

    Example:
        >>> ds = SyntheticShapesDataset(2, num_classes=4, image_size=32)
        >>> item = ds[1]
        >>> item["image"].shape, item["mask"].dtype
        (torch.Size([1, 32, 32]), torch.int64)
    """

    def __init__(
        self,
        num_samples: int,
        num_classes: int = 4,
        in_channels: int = 1,
        image_size: int = 64,
        seed: int = 0,
        split: Literal["train", "val", "test"] = "train",
    ) -> None:
        _check_args(num_classes, in_channels, image_size, seed)
        super().__init__(num_samples, seed, split)
        self.num_classes, self.in_channels, self.image_size = num_classes, in_channels, image_size

    def sample(self, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        """One image and mask (:func:`make_shapes_sample`)."""
        image, mask = make_shapes_sample(rng, self.num_classes, self.in_channels, self.image_size)
        return {"image": torch.from_numpy(image), "mask": torch.from_numpy(mask)}


def _check_args(num_classes: int, in_channels: int, image_size: int, seed: int) -> None:
    check_int("num_classes", num_classes, minimum=2)
    if in_channels not in (1, 3) or isinstance(in_channels, bool):
        raise LomixUserError(f"`in_channels` must be 1 or 3, got {in_channels!r}")
    check_int("image_size", image_size, minimum=16)
    check_int("seed", seed, minimum=0)


class SyntheticShapesDataModule(pl.LightningDataModule):
    """Synthetic multi-scale shapes for smoke tests, CPU demos and CI.

    ``class_names`` has one entry per class id (``"background"`` first), so ``len(class_names) == num_classes``.
    The predict loader serves the test images.

    Args:
        num_classes: Classes including background (>= 2).
        in_channels: 1 or 3.
        image_size: Side length of the square images (>= 16; use a multiple of 32 for 5-stage encoders).
        num_train: Training samples.
        num_val: Validation samples.
        num_test: Test samples.
        batch_size: Samples per batch.
        seed: Base seed; also seeds the training shuffle.
        num_workers: DataLoader workers.

    Raises:
        ValueError: On a non-positive count, ``num_classes < 2``, ``in_channels`` not in {1, 3} or
            ``image_size < 16``.

    Example:
        >>> dm = SyntheticShapesDataModule(num_classes=3, image_size=32, num_train=4, batch_size=2)
        >>> dm.num_classes, dm.in_channels, dm.class_names
        (3, 1, ['background', 'blob', 'lines'])
        >>> dm.setup("fit")
        >>> batch = next(iter(dm.train_dataloader()))
        >>> batch["image"].shape, batch["mask"].shape
        (torch.Size([2, 1, 32, 32]), torch.Size([2, 32, 32]))
    """

    def __init__(
        self,
        num_classes: int = 4,
        in_channels: int = 1,
        image_size: int = 64,
        num_train: int = 128,
        num_val: int = 32,
        num_test: int = 32,
        batch_size: int = 8,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        _check_args(num_classes, in_channels, image_size, seed)
        for name, value in (("num_train", num_train), ("num_val", num_val), ("num_test", num_test)):
            check_int(name, value, minimum=1)
        check_int("batch_size", batch_size, minimum=1)
        check_int("num_workers", num_workers, minimum=0)
        self.save_hyperparameters()
        self.num_classes, self.in_channels, self.image_size = num_classes, in_channels, image_size
        self.num_train, self.num_val, self.num_test = num_train, num_val, num_test
        self.batch_size, self.seed, self.num_workers = batch_size, seed, num_workers
        self.class_names = ["background"] + [
            _FAMILIES[(c - 1) % len(_FAMILIES)] + ("" if c <= len(_FAMILIES) else f"_{(c - 1) // len(_FAMILIES)}")
            for c in range(1, num_classes)
        ]
        self.train_set: SyntheticShapesDataset | None = None
        self.val_set: SyntheticShapesDataset | None = None
        self.test_set: SyntheticShapesDataset | None = None

    def _dataset(self, split: Literal["train", "val", "test"], n: int) -> SyntheticShapesDataset:
        return SyntheticShapesDataset(n, self.num_classes, self.in_channels, self.image_size, self.seed, split)

    def setup(self, stage: str | None = None) -> None:
        """Create the three datasets (cheap: samples are drawn lazily)."""
        self.train_set = self._dataset("train", self.num_train)
        self.val_set = self._dataset("val", self.num_val)
        self.test_set = self._dataset("test", self.num_test)

    def train_dataloader(self) -> DataLoader:
        """Shuffled training loader (shuffle seeded by ``seed``)."""
        if self.train_set is None:
            self.setup()
        return make_loader(self.train_set, self.batch_size, self.num_workers, shuffle=True, seed=self.seed)

    def val_dataloader(self) -> DataLoader:
        """Validation loader."""
        if self.val_set is None:
            self.setup()
        return make_loader(self.val_set, self.batch_size, self.num_workers, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """Test loader."""
        if self.test_set is None:
            self.setup()
        return make_loader(self.test_set, self.batch_size, self.num_workers, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        """The test images."""
        return self.test_dataloader()
