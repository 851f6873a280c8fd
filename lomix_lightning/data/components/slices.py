"""2-D slices stored one per file (``.npz``/``.h5``), as in the Synapse and ACDC preprocessed layouts."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from lomix_lightning.data.components.arrays import load_arrays, map_labels
from lomix_lightning.data.components.transforms import SeededTransform
from lomix_lightning.errors import LomixUserError

__all__ = ["SliceDataset"]


class SliceDataset(Dataset):
    """One grey-level slice and its label map per file, transformed by an albumentations pipeline.

    Items are ``{"image": float32 (1, H, W), "mask": int64 (H, W), "name": str}`` where ``H = W`` is set by the
    transform's final resize.

    Args:
        paths: Slice files.
        num_classes: Classes including background (after ``lut``).
        transform: The image/mask pipeline.
        image_key: Array name of the image.
        label_key: Array name of the label map.
        lut: Optional label lookup table (e.g. the Synapse 14 -> 9 remap).

    Raises:
        ValueError: From ``__getitem__``, naming the file: a missing key, an image that is not 2-D, an image and
            label of different shapes, or a label id outside the class range.

    Example:
        >>> import tempfile, os
        >>> from lomix_lightning.data.components.transforms import medical_eval_transform
        >>> d = tempfile.mkdtemp()
        >>> np.savez(os.path.join(d, "s.npz"), image=np.zeros((8, 8)), label=np.eye(8))
        >>> ds = SliceDataset([os.path.join(d, "s.npz")], 2, SeededTransform(medical_eval_transform(16), 0))
        >>> item = ds[0]
        >>> item["image"].shape, item["mask"].shape, item["mask"].dtype, item["name"]
        (torch.Size([1, 16, 16]), torch.Size([16, 16]), torch.int64, 's')
    """

    def __init__(
        self,
        paths: Sequence[str | Path],
        num_classes: int,
        transform: SeededTransform,
        image_key: str = "image",
        label_key: str = "label",
        lut: np.ndarray | None = None,
    ) -> None:
        self.paths = [Path(p) for p in paths]
        self.num_classes = num_classes
        self.transform = transform
        self.image_key, self.label_key = image_key, label_key
        self.lut = lut

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Read and check slice ``index`` without transforming it: ``(image float32 (H, W), label uint8 (H, W))``."""
        path = self.paths[index]
        data = load_arrays(path, [self.image_key, self.label_key])
        image, label = data[self.image_key], data[self.label_key]
        if image.ndim != 2:
            raise LomixUserError(
                f"{path}: expected a 2-D slice (H, W) under {self.image_key!r}, got shape {image.shape}"
            )
        if label.shape != image.shape:
            raise LomixUserError(f"{path}: image shape {image.shape} and label shape {label.shape} differ")
        return image.astype(np.float32), map_labels(label, self.num_classes, path, self.lut)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | str]:
        image, label = self.load(index)
        image, label = self.transform(image, label)
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)[None]),  # (H, W) -> (1, H, W)
            "mask": torch.from_numpy(label.astype(np.int64)),
            "name": self.paths[index].stem,
        }
