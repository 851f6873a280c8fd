"""Synapse multi-organ abdominal CT (BTCV) in the TransUNet layout.

Layout under ``root`` (written by :func:`~lomix_lightning.data.prepare_synapse.prepare_synapse`, or by the
TransUNet/LoMix preprocessing, whose folders are named ``train_npz_new``/``test_vol_h5_new``: pass ``train_dir``
and ``test_dir``)::

    root/train_npz/case0005_slice000.npz     # keys image (H, W) in [0, 1], label (H, W)
    root/test_vol_h5/case0001.npy.h5         # datasets image (D, H, W), label (D, H, W) [, spacing (3,)]
    list_dir/train.txt                       # slice names without extension: case0005_slice000
    list_dir/test_vol.txt                    # case names: case0001

Label ids. The raw BTCV labels have 14 ids: 1 spleen, 2 right kidney, 3 left kidney, 4 gallbladder, 5 esophagus,
6 liver, 7 stomach, 8 aorta, 9 inferior vena cava, 10 portal and splenic veins, 11 pancreas, 12 right adrenal gland,
13 left adrenal gland. The 8-organ task (``num_classes=9``) maps 5, 9, 10, 12, 13 to background and 11 to 5, giving
``background, spleen, right_kidney, left_kidney, gallbladder, pancreas, liver, stomach, aorta`` (the EMCAD/LoMix
order; ``class_order="btcv"``). TransUNet's own preprocessed release is already 9-class, in the order
``background, aorta, gallbladder, left_kidney, right_kidney, liver, pancreas, spleen, stomach``
(``class_order="transunet"``; no remap happens because no id exceeds 8).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np

from lomix_lightning.data.components.arrays import load_arrays
from lomix_lightning.data.components.lists import read_list_file, unique_in_order
from lomix_lightning.data.components.medical import SliceVolumeDataModule
from lomix_lightning.data.components.slices import SliceDataset
from lomix_lightning.data.components.splits import select_cases
from lomix_lightning.data.components.transforms import SeededTransform, medical_eval_transform, medical_train_transform
from lomix_lightning.data.components.validation import check_fraction, check_int
from lomix_lightning.data.components.volumes import VolumeDataset
from lomix_lightning.errors import LomixUserError

__all__ = ["SYNAPSE_14_TO_9", "SynapseDataModule", "synapse_class_names"]

#: Lookup table of the 14 -> 9 remap: raw id ``i`` becomes ``SYNAPSE_14_TO_9[i]``.
SYNAPSE_14_TO_9 = np.array([0, 1, 2, 3, 4, 0, 6, 7, 8, 0, 0, 5, 0, 0], dtype=np.uint8)

_BTCV_14 = (
    "background", "spleen", "right_kidney", "left_kidney", "gallbladder", "esophagus", "liver", "stomach", "aorta",
    "inferior_vena_cava", "portal_splenic_vein", "pancreas", "right_adrenal_gland", "left_adrenal_gland",
)  # fmt: skip
_BTCV_9 = (
    "background",
    "spleen",
    "right_kidney",
    "left_kidney",
    "gallbladder",
    "pancreas",
    "liver",
    "stomach",
    "aorta",
)
_TRANSUNET_9 = (
    "background", "aorta", "gallbladder", "left_kidney", "right_kidney", "liver", "pancreas", "spleen", "stomach",
)  # fmt: skip


def synapse_class_names(num_classes: int = 9, class_order: Literal["btcv", "transunet"] = "btcv") -> list[str]:
    """Class names by label id, background first.

    Args:
        num_classes: 9 (8 organs) or 14 (13 organs).
        class_order: ``"btcv"`` (raw ids, remapped for 9 classes) or ``"transunet"`` (TransUNet's 9-class release).

    Returns:
        ``num_classes`` names.

    Raises:
        ValueError: If ``num_classes`` is not 9 or 14, or ``"transunet"`` is combined with 14 classes.

    Example:
        >>> synapse_class_names(9)[1:4]
        ['spleen', 'right_kidney', 'left_kidney']
    """
    if num_classes not in (9, 14):
        raise LomixUserError(f"`num_classes` must be 9 (8 organs) or 14 (13 organs), got {num_classes!r}")
    if class_order not in ("btcv", "transunet"):
        raise LomixUserError(f"`class_order` must be 'btcv' or 'transunet', got {class_order!r}")
    if class_order == "transunet" and num_classes != 9:
        raise LomixUserError("`class_order='transunet'` only exists for num_classes=9")
    if num_classes == 14:
        return list(_BTCV_14)
    return list(_TRANSUNET_9 if class_order == "transunet" else _BTCV_9)


def _case_of(slice_name: str, list_file: Path) -> str:
    if "_slice" not in slice_name:
        raise LomixUserError(f"{list_file}: entry {slice_name!r} is not of the form <case>_slice<k>")
    return slice_name.rsplit("_slice", 1)[0]


class SynapseDataModule(SliceVolumeDataModule):
    """Synapse slices for training/validation and whole CT volumes for testing.

    * Train: slices of the training cases, with the reference augmentation
      (:func:`~lomix_lightning.data.components.transforms.medical_train_transform`) and a resize to ``img_size``.
    * Validation: slices of ``val_cases`` (held-out *training* cases), resized only. Never the test volumes.
      ``val_cases=[]`` disables validation (the loader is empty).
    * Test and predict: the ``test_vol.txt`` volumes, one per item at original resolution (``batch_size=1``).

    Limited labels (paper Table 3): ``train_fraction`` picks whole cases with ``seed``; the count is round half up
    of ``train_fraction`` times the number of cases in ``train.txt`` (18: 5% -> 1, 10% -> 2, 20% -> 4, 40% -> 7),
    drawn from the non-validation cases. ``train_cases`` lists them explicitly instead.

    Args:
        root: Folder holding ``train_dir`` and ``test_dir``.
        list_dir: Folder holding ``train.txt`` and ``test_vol.txt``.
        num_classes: 9 (8 organs, paper Table 1) or 14 (13 organs).
        img_size: Network input side length.
        batch_size: Training/validation batch size.
        val_cases: Training cases held out for validation. Default: the last two cases of the sorted training list
            (``case0039`` and ``case0040`` for the standard list).
        train_cases: Explicit training cases (default: all non-validation cases).
        train_fraction: Fraction of the training cases to use, in (0, 1]; exclusive with ``train_cases``.
        seed: Seed of the case selection, the augmentation stream and the training shuffle.
        remap_14_to_9: Apply the 14 -> 9 remap. ``None``: when ``num_classes == 9`` and a probe of the training
            labels (every 8th slice, stopping at the first hit) finds an id above 8.
        class_order: Naming of the 9 classes, see the module docstring.
        train_dir: Sub-folder of ``root`` with the slice files.
        test_dir: Sub-folder of ``root`` with the test volumes.
        return_spacing: Add the volumes' stored ``spacing`` (``prepare_synapse`` writes it; TransUNet's files have
            none) to test items, so that HD95 is in mm. Default ``False``: HD95 in voxel units, as in the paper.
        num_workers: DataLoader workers.

    Raises:
        ValueError: On bad arguments here; in ``setup``, on unknown cases, missing files, missing keys or
            out-of-range labels (naming the file).

    Example:
        >>> dm = SynapseDataModule(root="data/synapse", list_dir="lists/lists_Synapse")
        >>> dm.num_classes, dm.in_channels, dm.class_names[-1]
        (9, 1, 'aorta')
    """

    def __init__(
        self,
        root: str,
        list_dir: str,
        num_classes: int = 9,
        img_size: int = 224,
        batch_size: int = 6,
        val_cases: Sequence[str] | None = None,
        train_cases: Sequence[str] | None = None,
        train_fraction: float | None = None,
        seed: int = 1234,
        remap_14_to_9: bool | None = None,
        class_order: Literal["btcv", "transunet"] = "btcv",
        train_dir: str = "train_npz",
        test_dir: str = "test_vol_h5",
        return_spacing: bool = False,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.class_names = synapse_class_names(num_classes, class_order)
        check_int("img_size", img_size, minimum=8)
        check_int("batch_size", batch_size, minimum=1)
        check_int("seed", seed, minimum=0)
        check_int("num_workers", num_workers, minimum=0)
        if train_cases is not None and train_fraction is not None:
            raise LomixUserError("give at most one of `train_cases` and `train_fraction`")
        if train_fraction is not None:
            check_fraction("train_fraction", train_fraction)
        if remap_14_to_9 and num_classes != 9:
            raise LomixUserError(f"`remap_14_to_9=True` needs num_classes=9, got {num_classes}")
        for name, value in (("val_cases", val_cases), ("train_cases", train_cases)):
            if isinstance(value, str):
                raise LomixUserError(f"`{name}` must be a list of case names, got the string {value!r}")
        self.save_hyperparameters()
        self.root, self.list_dir = Path(root), Path(list_dir)
        self.num_classes, self.in_channels, self.img_size = num_classes, 1, img_size
        self.batch_size, self.seed, self.num_workers = batch_size, seed, num_workers
        self.val_cases_arg = None if val_cases is None else list(val_cases)
        self.train_cases_arg = None if train_cases is None else list(train_cases)
        self.train_fraction, self.remap_14_to_9 = train_fraction, remap_14_to_9
        self.train_dir, self.test_dir = self.root / train_dir, self.root / test_dir
        self.return_spacing = return_spacing
        # Resolved in setup():
        self.train_case_names: list[str] = []
        self.val_case_names: list[str] = []
        self.test_case_names: list[str] = []
        self.remap_applied: bool | None = None
        self.train_set: SliceDataset | None = None
        self.val_set: SliceDataset | None = None
        self.test_set: VolumeDataset | None = None

    # ---------------------------------------------------------------- resolution of lists and cases
    def _slice_path(self, name: str) -> Path:
        return self.train_dir / f"{name}.npz"

    def _resolve(self) -> dict[str, list[str]]:
        """Read train.txt, check the files and split the slices into train/val by case."""
        list_file = self.list_dir / "train.txt"
        names = read_list_file(list_file)
        cases = unique_in_order(_case_of(n, list_file) for n in names)
        known = set(cases)
        for arg_name, arg in (("val_cases", self.val_cases_arg), ("train_cases", self.train_cases_arg)):
            unknown = sorted(set(arg or ()) - known)
            if unknown:
                raise LomixUserError(f"`{arg_name}` {unknown} not found in {list_file} (cases there: {sorted(known)})")
        if self.val_cases_arg is None:
            if len(cases) < 3:
                raise LomixUserError(f"{list_file} has {len(cases)} cases; pass `val_cases` (or []) explicitly")
            val = sorted(cases)[-2:]
        else:
            val = sorted(set(self.val_cases_arg))
        if self.train_cases_arg is not None:
            overlap = sorted(set(self.train_cases_arg) & set(val))
            if overlap:
                raise LomixUserError(f"`train_cases` and the validation cases overlap: {overlap}")
            train = sorted(set(self.train_cases_arg))
        elif self.train_fraction is not None:
            train = select_cases(cases, self.train_fraction, self.seed, exclude=val)
        else:
            train = sorted(known - set(val))
        if not train:
            raise LomixUserError(f"no training case left after holding out {val} for validation")
        missing = [str(self._slice_path(n)) for n in names if not self._slice_path(n).is_file()]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} slice file(s) listed in {list_file} are missing, e.g. {missing[:3]}"
            )
        self.train_case_names, self.val_case_names = train, val
        by_case = {"train": set(train), "val": set(val)}
        return {split: [n for n in names if _case_of(n, list_file) in keep] for split, keep in by_case.items()}

    def _decide_remap(self, train_slices: list[str]) -> bool:
        if self.num_classes != 9:
            return False
        if self.remap_14_to_9 is not None:
            return self.remap_14_to_9
        for name in train_slices[::8]:
            label = load_arrays(self._slice_path(name), ["label"])["label"]
            if label.size and label.max() > 8:
                return True
        return False

    def _test_paths(self) -> list[Path]:
        list_file = self.list_dir / "test_vol.txt"
        self.test_case_names = read_list_file(list_file)
        paths = [self.test_dir / f"{c}.npy.h5" for c in self.test_case_names]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} test volume(s) listed in {list_file} are missing: {missing[:3]}")
        return paths

    # ---------------------------------------------------------------- Lightning hooks
    def setup(self, stage: str | None = None) -> None:
        """Resolve the case split, the label remap and the datasets needed for ``stage``."""
        slices = self._resolve()
        if self.remap_applied is None:
            self.remap_applied = self._decide_remap(slices["train"] + slices["val"])
        lut = SYNAPSE_14_TO_9 if self.remap_applied else None
        if stage in (None, "fit", "validate"):
            paths = {k: [self._slice_path(n) for n in v] for k, v in slices.items()}
            train_tf = SeededTransform(medical_train_transform(self.img_size), self.seed)
            self.train_set = SliceDataset(paths["train"], self.num_classes, train_tf, lut=lut)
            eval_tf = SeededTransform(medical_eval_transform(self.img_size), self.seed)
            self.val_set = SliceDataset(paths["val"], self.num_classes, eval_tf, lut=lut)
        if stage in (None, "test", "predict"):
            paths = self._test_paths()
            self.test_set = VolumeDataset(
                paths, self.num_classes, lut=lut, case_names=self.test_case_names, return_spacing=self.return_spacing
            )
