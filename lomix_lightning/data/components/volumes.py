"""Whole test volumes (one case per item) at their original resolution, for slice-wise 3-D evaluation."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from lomix_lightning.data.components.arrays import load_arrays, map_labels, optional_array
from lomix_lightning.errors import LomixUserError

__all__ = ["VolumeDataset"]


class VolumeDataset(Dataset):
    """One 3-D volume and its label volume per file (``.npz`` or HDF5).

    Items are ``{"image": float32 (D, H, W), "mask": int64 (D, H, W), "case_name": str, "volume": True}`` plus,
    with ``return_spacing`` and when the file stores a ``spacing`` array, ``"spacing"`` (float32 ``(3,)``, one value
    per array axis ``(D, H, W)``). Use a DataLoader with ``batch_size=1``.

    Args:
        paths: Volume files.
        num_classes: Classes including background (after ``lut``).
        image_key: Array name of the image volume.
        label_key: Array name of the label volume.
        lut: Optional label lookup table.
        case_names: Names reported as ``case_name`` (default: the file name up to its first dot).
        return_spacing: Yield the stored voxel spacing (then HD95 is computed in physical units, e.g. mm).

    Raises:
        ValueError: From ``__getitem__``, naming the file: a missing key, a volume that is not 3-D, image and label
            shapes that differ, or a label id outside the class range.

    Example:
        >>> import tempfile, os
        >>> d = tempfile.mkdtemp()
        >>> np.savez(os.path.join(d, "patient001.npz"), img=np.zeros((3, 8, 8)), label=np.ones((3, 8, 8)))
        >>> item = VolumeDataset([os.path.join(d, "patient001.npz")], 4, image_key="img")[0]
        >>> item["image"].shape, item["mask"].dtype, item["case_name"], item["volume"]
        (torch.Size([3, 8, 8]), torch.int64, 'patient001', True)
    """

    def __init__(
        self,
        paths: Sequence[str | Path],
        num_classes: int,
        image_key: str = "image",
        label_key: str = "label",
        lut: np.ndarray | None = None,
        case_names: Sequence[str] | None = None,
        return_spacing: bool = False,
    ) -> None:
        self.paths = [Path(p) for p in paths]
        if case_names is not None and len(case_names) != len(self.paths):
            raise LomixUserError(f"got {len(case_names)} case names for {len(self.paths)} volumes")
        self.case_names = list(case_names) if case_names is not None else [p.name.split(".")[0] for p in self.paths]
        self.num_classes = num_classes
        self.image_key, self.label_key = image_key, label_key
        self.lut = lut
        self.return_spacing = return_spacing

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | str | bool]:
        path = self.paths[index]
        data = load_arrays(path, [self.image_key, self.label_key], optional=["spacing"] if self.return_spacing else [])
        image, label = data[self.image_key], data[self.label_key]
        if image.ndim != 3:
            raise LomixUserError(f"{path}: expected a 3-D volume (D, H, W) under {self.image_key!r}, got {image.shape}")
        if label.shape != image.shape:
            raise LomixUserError(f"{path}: image shape {image.shape} and label shape {label.shape} differ")
        item: dict[str, torch.Tensor | str | bool] = {
            "image": torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)),
            "mask": torch.from_numpy(map_labels(label, self.num_classes, path, self.lut).astype(np.int64)),
            "case_name": self.case_names[index],
            "volume": True,
        }
        spacing = optional_array(data, "spacing")
        if spacing is not None:
            if spacing.shape != (3,):
                raise LomixUserError(f"{path}: 'spacing' must hold 3 values (D, H, W axes), got shape {spacing.shape}")
            item["spacing"] = torch.from_numpy(spacing)
        return item
