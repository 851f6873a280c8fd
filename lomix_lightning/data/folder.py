"""Binary 2-D segmentation from a folder of images and a folder of masks: the dataset and its data module.

The pairing and binarisation rules are those of :mod:`lomix_lightning.data.components.pairs`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from lomix_lightning.data.components.lists import read_list_file
from lomix_lightning.data.components.loaders import make_loader
from lomix_lightning.data.components.multiscale import MultiScaleCollate
from lomix_lightning.data.components.pairs import (
    IMAGE_EXTENSIONS,
    MASK_SUFFIXES,
    FolderPair,
    load_binary_mask,
    load_pair,
    pair_files,
)
from lomix_lightning.data.components.splits import check_split_ratios, split_by_ratio
from lomix_lightning.data.components.transforms import SeededTransform, folder_eval_transform, folder_train_transform
from lomix_lightning.data.components.validation import check_fixed_classes, check_int
from lomix_lightning.errors import LomixUserError

__all__ = [
    "IMAGE_EXTENSIONS",
    "MASK_SUFFIXES",
    "FolderPair",
    "FolderSegmentationDataModule",
    "FolderSegmentationDataset",
    "load_binary_mask",
    "pair_files",
]


class FolderSegmentationDataset(Dataset):
    """Image/mask pairs as ``{"image": float32 (3, S, S) normalised, "mask": int64 (S, S) 0/1, "name": stem}``.

    Args:
        pairs: From :func:`pair_files`.
        transform: Pipeline ending in a resize to ``S`` and ImageNet normalisation.

    Raises:
        ValueError: From ``__getitem__``, when an image and its mask differ in size (naming both files).

    Example:
        >>> import tempfile, os
        >>> from PIL import Image
        >>> from lomix_lightning.data.components.transforms import folder_eval_transform
        >>> d = tempfile.mkdtemp()
        >>> Image.new("RGB", (10, 8)).save(os.path.join(d, "x.jpg"))
        >>> Image.new("L", (10, 8), 255).save(os.path.join(d, "x_mask.png"))
        >>> ds = FolderSegmentationDataset(pair_files(d, d), SeededTransform(folder_eval_transform(32), 0))
        >>> ds[0]["image"].shape, ds[0]["mask"].unique().tolist()
        (torch.Size([3, 32, 32]), [1])
    """

    def __init__(self, pairs: list[FolderPair], transform: SeededTransform) -> None:
        self.pairs = list(pairs)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | str]:
        image, mask = load_pair(self.pairs[index])
        image, mask = self.transform(image, mask)
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32)),  # HWC->CHW
            "mask": torch.from_numpy(mask.astype(np.int64)),
            "name": self.pairs[index].stem,
        }


class FolderSegmentationDataModule(pl.LightningDataModule):
    """Binary segmentation (one logit channel) from image/mask folders, for the ``structure`` loss.

    Pairing and binarisation follow :mod:`lomix_lightning.data.components.pairs`. The train/val/test split is a seeded
    ``splits`` ratio split of the sorted image stems, or, with ``split_files``, the stems listed in
    ``train.txt``/``val.txt``/``test.txt`` there. Training images get the rotation/flip augmentation (when
    ``augment``), then each *batch* is resized to one of ``round(img_size * scale / 32) * 32`` for a random
    ``scale`` in ``multiscale``. Validation and test images are resized to ``img_size`` only, so their masks are
    evaluated at ``img_size`` resolution. Images are ImageNet-normalised; masks are int64 0/1.

    Args:
        images_dir: Folder of images.
        masks_dir: Folder of masks (may equal ``images_dir``).
        img_size: Base side length.
        splits: ``(train, val, test)`` ratios summing to 1.
        split_files: Folder with ``train.txt``, ``val.txt``, ``test.txt`` of image stems (overrides ``splits``).
        seed: Seed of the split, the augmentation, the scale choice and the shuffle.
        multiscale: Training scales; ``[1.0]`` for single-scale training.
        augment: Random rotation (+-90 degrees) and horizontal/vertical flips for training.
        batch_size: Batch size.
        num_workers: DataLoader workers.
        class_name: Name of the foreground class (``class_names == [class_name]``).
        num_classes: Always 1 (one foreground logit channel, for the ``structure`` loss). It is a parameter so
            that the CLI's link from ``--model.num_classes`` is checked when the command line is parsed.

    Raises:
        ValueError: On bad arguments; in ``setup``, on an empty folder, images without masks, an unknown stem in a
            split file, or a stem listed twice.

    Example:
        >>> dm = FolderSegmentationDataModule("data/Kvasir/images", "data/Kvasir/masks")
        >>> dm.num_classes, dm.in_channels, dm.class_names
        (1, 3, ['foreground'])
    """

    def __init__(
        self,
        images_dir: str,
        masks_dir: str,
        img_size: int = 352,
        splits: tuple[float, float, float] = (0.8, 0.1, 0.1),
        split_files: str | None = None,
        seed: int = 42,
        multiscale: Sequence[float] = (0.75, 1.0, 1.25),
        augment: bool = True,
        batch_size: int = 16,
        num_workers: int = 0,
        class_name: str = "foreground",
        num_classes: Literal[1] = 1,
    ) -> None:
        super().__init__()
        check_fixed_classes(type(self).__name__, num_classes, 1, ("one foreground logit channel",))
        check_int("img_size", img_size, minimum=32)
        check_int("batch_size", batch_size, minimum=1)
        check_int("seed", seed, minimum=0)
        check_int("num_workers", num_workers, minimum=0)
        check_split_ratios(splits)
        self.collate = MultiScaleCollate(img_size, multiscale, seed)  # validates the scales
        self.save_hyperparameters()
        self.images_dir, self.masks_dir = Path(images_dir), Path(masks_dir)
        self.split_files = None if split_files is None else Path(split_files)
        self.img_size, self.splits, self.seed, self.augment = img_size, tuple(splits), seed, augment
        self.batch_size, self.num_workers = batch_size, num_workers
        self.num_classes, self.in_channels, self.class_names = num_classes, 3, [class_name]
        self.split_stems: dict[str, list[str]] = {}
        self.train_set: FolderSegmentationDataset | None = None
        self.val_set: FolderSegmentationDataset | None = None
        self.test_set: FolderSegmentationDataset | None = None

    def _split(self, pairs: list[FolderPair]) -> dict[str, list[str]]:
        stems = [p.stem for p in pairs]
        if self.split_files is None:
            train, val, test = split_by_ratio(stems, self.splits, self.seed)
            return {"train": train, "val": val, "test": test}
        known, seen, out = set(stems), {}, {}
        for split in ("train", "val", "test"):
            list_file = self.split_files / f"{split}.txt"
            entries = read_list_file(list_file)
            unknown = [s for s in entries if s not in known]
            if unknown:
                raise LomixUserError(
                    f"{list_file}: {len(unknown)} stem(s) without an image/mask pair, e.g. {unknown[:5]}"
                )
            twice = [s for s in entries if s in seen]
            if twice:
                raise LomixUserError(f"{list_file}: stem(s) {twice[:5]} already listed in {seen[twice[0]]}")
            seen.update(dict.fromkeys(entries, list_file))
            out[split] = entries
        return out

    def setup(self, stage: str | None = None) -> None:
        """Pair the files, split them and build the datasets."""
        pairs = pair_files(self.images_dir, self.masks_dir)
        self.split_stems = self._split(pairs)
        by_stem = {p.stem: p for p in pairs}

        def dataset(split: str, transform: SeededTransform) -> FolderSegmentationDataset:
            return FolderSegmentationDataset([by_stem[s] for s in self.split_stems[split]], transform)

        train_tf = SeededTransform(folder_train_transform(self.img_size, self.augment), self.seed)
        eval_tf = SeededTransform(folder_eval_transform(self.img_size), self.seed)
        self.train_set = dataset("train", train_tf)
        self.val_set = dataset("val", eval_tf)
        self.test_set = dataset("test", eval_tf)

    def _loader(self, split: str) -> DataLoader:
        if self.train_set is None:
            self.setup()
        dataset = {"train": self.train_set, "val": self.val_set, "test": self.test_set}[split]
        if len(dataset) == 0:
            raise LomixUserError(f"the {split} split is empty (splits={self.splits}, split_files={self.split_files})")
        if split == "train":
            return make_loader(dataset, self.batch_size, self.num_workers, True, self.seed, collate_fn=self.collate)
        return make_loader(dataset, self.batch_size, self.num_workers, shuffle=False)

    def train_dataloader(self) -> DataLoader:
        """Shuffled, augmented, multi-scale training batches."""
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        """Validation images at ``img_size``."""
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        """Test images at ``img_size``."""
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        """The test images."""
        return self._loader("test")
