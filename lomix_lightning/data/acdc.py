"""ACDC cardiac MRI in the preprocessed EMCAD/CASCADE (MT-UNet) format.

Layout::

    root/train/<name>.npz      # 2-D slices: keys img (H, W), label (H, W) with ids 0 bg, 1 RV, 2 Myo, 3 LV
    root/valid/<name>.npz      # 2-D slices, same keys
    root/test/<name>.npz       # volumes: img (D, H, W), label (D, H, W) [, spacing (3,)]
    list_dir/train.txt, valid.txt, test.txt   # file names including the extension, one per line

When ``list_dir`` is ``None``, the lists are looked up in ``root/lists_ACDC`` and then ``root``; where a list file
does not exist, the sorted ``*.npz`` files of the split folder are used.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from lomix_lightning.data.components.lists import read_list_file
from lomix_lightning.data.components.medical import SliceVolumeDataModule
from lomix_lightning.data.components.slices import SliceDataset
from lomix_lightning.data.components.transforms import SeededTransform, medical_eval_transform, medical_train_transform
from lomix_lightning.data.components.validation import check_fixed_classes, check_int
from lomix_lightning.data.components.volumes import VolumeDataset
from lomix_lightning.errors import LomixUserError

__all__ = ["ACDC_CLASS_NAMES", "ACDCDataModule"]

ACDC_CLASS_NAMES = ("background", "RV", "Myo", "LV")
_LIST_NAMES = {"train": "train.txt", "valid": "valid.txt", "test": "test.txt"}


class ACDCDataModule(SliceVolumeDataModule):
    """ACDC slices for training/validation and whole short-axis volumes for testing (4 classes with background).

    Training slices get the same augmentation as Synapse
    (:func:`~lomix_lightning.data.components.transforms.medical_train_transform`); validation slices are resized only;
    test/predict items are whole volumes at original resolution (``batch_size=1``).

    Args:
        root: Folder with ``train/``, ``valid/`` and ``test/``.
        list_dir: Folder with ``train.txt``, ``valid.txt``, ``test.txt`` (see the module docstring for ``None``).
        img_size: Network input side length.
        batch_size: Training/validation batch size.
        seed: Seed of the augmentation stream and the training shuffle.
        return_spacing: Add a volume's stored ``spacing`` array (if any) to test items, so that HD95 is in mm.
            Default ``False``: voxel units, as in the paper.
        num_workers: DataLoader workers.
        num_classes: Always 4 (background, RV, Myo, LV). It is a parameter so that the CLI's link from
            ``--model.num_classes`` is checked when the command line is parsed: another value is refused there.

    Raises:
        ValueError: On bad arguments; in ``setup``, on an empty split, missing keys or out-of-range labels
            (naming the file).
        FileNotFoundError: In ``setup``, on a listed file that does not exist.

    Example:
        >>> dm = ACDCDataModule(root="data/ACDC")
        >>> dm.num_classes, dm.in_channels, dm.class_names
        (4, 1, ['background', 'RV', 'Myo', 'LV'])
    """

    def __init__(
        self,
        root: str,
        list_dir: str | None = None,
        img_size: int = 224,
        batch_size: int = 12,
        seed: int = 1234,
        return_spacing: bool = False,
        num_workers: int = 0,
        num_classes: Literal[4] = 4,
    ) -> None:
        super().__init__()
        check_fixed_classes(type(self).__name__, num_classes, len(ACDC_CLASS_NAMES), ACDC_CLASS_NAMES)
        check_int("img_size", img_size, minimum=8)
        check_int("batch_size", batch_size, minimum=1)
        check_int("seed", seed, minimum=0)
        check_int("num_workers", num_workers, minimum=0)
        self.save_hyperparameters()
        self.root = Path(root)
        self.list_dir = None if list_dir is None else Path(list_dir)
        self.num_classes, self.in_channels, self.class_names = num_classes, 1, list(ACDC_CLASS_NAMES)
        self.img_size, self.batch_size, self.seed, self.num_workers = img_size, batch_size, seed, num_workers
        self.return_spacing = return_spacing
        self.train_set: SliceDataset | None = None
        self.val_set: SliceDataset | None = None
        self.test_set: VolumeDataset | None = None

    def _list_file(self, split: str) -> Path | None:
        candidates = [self.list_dir] if self.list_dir is not None else [self.root / "lists_ACDC", self.root]
        for folder in candidates:
            path = folder / _LIST_NAMES[split]
            if path.is_file():
                return path
        if self.list_dir is not None:
            raise FileNotFoundError(f"list file not found: {self.list_dir / _LIST_NAMES[split]}")
        return None

    def split_paths(self, split: str) -> list[Path]:
        """Files of ``split`` (``"train"``, ``"valid"`` or ``"test"``), checked to exist."""
        folder = self.root / split
        list_file = self._list_file(split)
        if list_file is not None:
            paths = [folder / name for name in read_list_file(list_file)]
            missing = [str(p) for p in paths if not p.is_file()]
            if missing:
                raise FileNotFoundError(f"{len(missing)} file(s) listed in {list_file} are missing, e.g. {missing[:3]}")
            return paths
        paths = sorted(folder.glob("*.npz"))
        if not paths:
            raise LomixUserError(f"no list file {_LIST_NAMES[split]} and no .npz files in {folder}")
        return paths

    def setup(self, stage: str | None = None) -> None:
        """Build the datasets needed for ``stage``."""
        if stage in (None, "fit", "validate"):
            train_tf = SeededTransform(medical_train_transform(self.img_size), self.seed)
            self.train_set = SliceDataset(self.split_paths("train"), 4, train_tf, image_key="img")
            eval_tf = SeededTransform(medical_eval_transform(self.img_size), self.seed)
            self.val_set = SliceDataset(self.split_paths("valid"), 4, eval_tf, image_key="img")
        if stage in (None, "test", "predict"):
            self.test_set = VolumeDataset(
                self.split_paths("test"), 4, image_key="img", return_spacing=self.return_spacing
            )
