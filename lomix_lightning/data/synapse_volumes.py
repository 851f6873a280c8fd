"""Synapse as 3-D volumes: foreground-balanced random patches for training, whole volumes for testing.

Reads what ``lomix prepare-synapse RAW OUT --train_volumes`` writes::

    OUT/train_vol_h5/case0005.npy.h5   # image float32 (z, x, y) in [0, 1], label uint8 (z, x, y) raw ids, spacing (3,)
    OUT/test_vol_h5/case0001.npy.h5    # the same for the test cases

Volumes stay at their native voxel spacing (no resampling, like the 2-D pipeline); ``spacing`` is passed on with
every test and validation volume, so HD95 is in mm. Training patches are drawn by MONAI's ``RandCropByPosNegLabeld``
(a patch centred on a foreground voxel with probability ``pos / (pos + neg)``, else on any voxel) after padding a
volume smaller than the patch, plus random flips. Needs MONAI (``pip install "lomix-lightning[monai]"``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset

from lomix_lightning.data.components.loaders import make_loader
from lomix_lightning.data.components.validation import check_int
from lomix_lightning.data.components.volumes import VolumeDataset
from lomix_lightning.data.synapse import SYNAPSE_14_TO_9, synapse_class_names
from lomix_lightning.errors import LomixUserError

__all__ = ["SynapseVolumesDataModule", "VolumePatchDataset"]


class _Volumes(Dataset):
    """Whole volumes as 3-D network inputs: ``image (1, D, H, W)``, ``mask (D, H, W)``, ``spacing``, ``name``."""

    def __init__(self, volumes: VolumeDataset) -> None:
        self.volumes = volumes

    def __len__(self) -> int:
        return len(self.volumes)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | str]:
        item = self.volumes[index]
        out = {"image": item["image"][None], "mask": item["mask"], "name": item["case_name"]}
        if "spacing" in item:
            out["spacing"] = item["spacing"].float()
        return out


class VolumePatchDataset(Dataset):
    """``samples_per_volume`` foreground-balanced random patches of each volume per epoch (MONAI transforms).

    Item ``i`` is a patch of volume ``i // samples_per_volume``. With ``fixed=True`` (validation) item ``i`` is
    always the same patch (seeded by ``(seed, i)``); otherwise patches are drawn from torch's random stream (seeded
    per worker by Lightning).

    Args:
        volumes: Whole volumes (:class:`~lomix_lightning.data.components.volumes.VolumeDataset` items).
        patch_size: Patch size ``(D, H, W)``.
        samples_per_volume: Patches per volume and epoch.
        pos: Weight of foreground-centred patches.
        neg: Weight of patches centred anywhere.
        flip: Random flips along each axis (training).
        fixed: The same patch for an index every time (validation).
        seed: Seed of the fixed patches.
    """

    def __init__(
        self,
        volumes: VolumeDataset,
        patch_size: Sequence[int],
        samples_per_volume: int = 4,
        pos: float = 2.0,
        neg: float = 1.0,
        flip: bool = True,
        fixed: bool = False,
        seed: int = 0,
    ) -> None:
        from lomix_lightning.models.monai import require_monai

        transforms = require_monai().transforms
        self.volumes, self.samples_per_volume, self.fixed, self.seed = volumes, samples_per_volume, fixed, seed
        keys = ["image", "mask"]
        steps = [
            transforms.SpatialPadd(keys=keys, spatial_size=list(patch_size)),
            transforms.RandCropByPosNegLabeld(
                keys=keys, label_key="mask", spatial_size=list(patch_size), pos=pos, neg=neg, num_samples=1
            ),
        ]
        if flip:
            steps += [transforms.RandFlipd(keys=keys, prob=0.5, spatial_axis=axis) for axis in range(3)]
        self.transform = transforms.Compose(steps)

    def __len__(self) -> int:
        return len(self.volumes) * self.samples_per_volume

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | str]:
        item = self.volumes[index // self.samples_per_volume]
        seed = self.seed * 1_000_003 + index if self.fixed else int(torch.randint(2**31 - 1, ()).item())
        self.transform.set_random_state(seed=seed)
        data = {"image": item["image"][None], "mask": item["mask"][None]}  # channel-first for MONAI
        patch = self.transform(data)[0]  # RandCropByPosNegLabeld returns a list of num_samples dicts
        image = torch.as_tensor(patch["image"]).as_subclass(torch.Tensor).float().contiguous()
        mask = torch.as_tensor(patch["mask"]).as_subclass(torch.Tensor)[0].long().contiguous()
        return {"image": image, "mask": mask, "name": f"{item['case_name']}_{index % self.samples_per_volume}"}


class SynapseVolumesDataModule(pl.LightningDataModule):
    """Synapse multi-organ CT as 3-D volumes: random patches to train, whole volumes to test (sliding window).

    * Train: ``samples_per_volume`` foreground-balanced patches per training volume and epoch.
    * Validation: fixed patches (``val_samples_per_volume`` each) of ``val_cases``, held-out training cases.
    * Test and predict: the whole ``test_vol_h5`` volumes, one per batch, with their spacing; set
      ``model.sliding_window`` so the module predicts them window by window.

    Args:
        root: Folder written by ``lomix prepare-synapse ... --train_volumes``.
        num_classes: 9 (the paper's 8 organs: the raw ids are remapped) or 14.
        patch_size: Training patch ``(D, H, W)`` = ``(z, x, y)`` in voxels.
        batch_size: Patches per batch.
        samples_per_volume: Training patches per volume and epoch.
        val_cases: Held-out training cases (default: the last two of the sorted training volumes).
        val_samples_per_volume: Validation patches per validation volume.
        pos: Weight of foreground-centred patches.
        neg: Weight of patches centred anywhere.
        train_dir: Sub-folder with the training volumes.
        test_dir: Sub-folder with the test volumes.
        seed: Seed of the shuffle and of the validation patches.
        num_workers: DataLoader workers.

    Example:
        >>> dm = SynapseVolumesDataModule(root="data/synapse", patch_size=(48, 160, 160))
        >>> dm.num_classes, dm.in_channels, dm.class_names[1]
        (9, 1, 'spleen')
    """

    def __init__(
        self,
        root: str = "data/synapse",
        num_classes: Literal[9, 14] = 9,
        patch_size: tuple[int, int, int] = (48, 160, 160),
        batch_size: int = 2,
        samples_per_volume: int = 4,
        val_cases: list[str] | None = None,
        val_samples_per_volume: int = 2,
        pos: float = 2.0,
        neg: float = 1.0,
        train_dir: str = "train_vol_h5",
        test_dir: str = "test_vol_h5",
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if num_classes not in (9, 14):
            raise LomixUserError(f"`num_classes` must be 9 or 14, got {num_classes!r}")
        if len(patch_size) != 3:
            raise LomixUserError(f"`patch_size` must be three sizes (D, H, W), got {patch_size!r}")
        for i, size in enumerate(patch_size):
            check_int(f"patch_size[{i}]", size, minimum=1)
        for name, value in (("batch_size", batch_size), ("samples_per_volume", samples_per_volume)):
            check_int(name, value, minimum=1)
        check_int("val_samples_per_volume", val_samples_per_volume, minimum=1)
        check_int("num_workers", num_workers, minimum=0)
        if pos < 0 or neg < 0 or pos + neg <= 0:
            raise LomixUserError(f"`pos` and `neg` must be >= 0 with a positive sum, got {pos} and {neg}")
        self.save_hyperparameters()
        self.root, self.num_classes, self.in_channels = Path(root), num_classes, 1
        self.patch_size, self.batch_size, self.seed, self.num_workers = tuple(patch_size), batch_size, seed, num_workers
        self.samples_per_volume, self.val_samples_per_volume = samples_per_volume, val_samples_per_volume
        self.val_cases, self.pos, self.neg = val_cases, pos, neg
        self.train_dir, self.test_dir = train_dir, test_dir
        self.class_names = synapse_class_names(num_classes)
        self._lut = SYNAPSE_14_TO_9 if num_classes == 9 else None

    def _paths(self, folder: str) -> list[Path]:
        paths = sorted((self.root / folder).glob("*.npy.h5"))
        if not paths:
            hint = " (run `lomix prepare-synapse RAW OUT --train_volumes`)" if folder == self.train_dir else ""
            raise LomixUserError(f"no *.npy.h5 volumes in {self.root / folder}{hint}")
        return paths

    def _volumes(self, paths: list[Path]) -> VolumeDataset:
        return VolumeDataset(paths, self.num_classes, lut=self._lut, return_spacing=True)

    def _split(self) -> tuple[list[Path], list[Path]]:
        paths = self._paths(self.train_dir)
        names = {p.name.split(".")[0]: p for p in paths}
        val = list(names)[-2:] if self.val_cases is None else list(self.val_cases)
        unknown = sorted(set(val) - set(names))
        if unknown:
            raise LomixUserError(f"val_cases {unknown} are not in {self.root / self.train_dir} (found {sorted(names)})")
        train = [p for n, p in names.items() if n not in val]
        if not train:
            raise LomixUserError(f"no training volume left after holding out val_cases {val}")
        return train, [names[n] for n in val]

    def _patches(self, paths: list[Path], per_volume: int, train: bool) -> VolumePatchDataset:
        return VolumePatchDataset(
            self._volumes(paths),
            self.patch_size,
            per_volume,
            self.pos,
            self.neg,
            flip=train,
            fixed=not train,
            seed=self.seed,
        )

    def train_dataloader(self) -> DataLoader:
        """Random foreground-balanced patches of the training volumes."""
        dataset = self._patches(self._split()[0], self.samples_per_volume, train=True)
        return make_loader(dataset, self.batch_size, self.num_workers, shuffle=True, seed=self.seed)

    def val_dataloader(self) -> DataLoader:
        """Fixed patches of the validation volumes."""
        dataset = self._patches(self._split()[1], self.val_samples_per_volume, train=False)
        return make_loader(dataset, self.batch_size, self.num_workers, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """Whole test volumes with their spacing, one per batch."""
        return make_loader(_Volumes(self._volumes(self._paths(self.test_dir))), 1, self.num_workers, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        """The test volumes."""
        return self.test_dataloader()
