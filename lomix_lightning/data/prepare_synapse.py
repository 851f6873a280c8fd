"""Convert the raw Synapse/BTCV abdomen CT NIfTI files into the layout read by ``SynapseDataModule``.

Input: ``imgXXXX.nii.gz`` and ``labelXXXX.nii.gz`` anywhere below ``raw_dir`` in sibling ``img/`` and ``label/``
folders (for instance ``RawData/Training/img`` and ``RawData/Training/label`` of the Synapse download).

Processing, as the LoMix/EMCAD reference: intensities clipped to ``[hu_min, hu_max]`` = [-125, 275] HU and scaled to
[0, 1]; arrays transposed from the NIfTI ``(x, y, z)`` to ``(z, x, y)``; no resampling or reorientation; labels kept
with their 14 raw ids (the 14 -> 9 remap happens in the data module). Output::

    out_dir/train_npz/case0005_slice000.npz   # image float32 (x, y), label uint8 (x, y); one per axial slice
    out_dir/test_vol_h5/case0001.npy.h5       # image float32 (z, x, y), label uint8 (z, x, y), spacing (3,)
    out_dir/lists/train.txt, test_vol.txt     # slice names / case names
    out_dir/train_vol_h5/case0005.npy.h5      # with train_volumes=True: whole training volumes, as the test ones

``spacing`` is the voxel size along the stored axes ``(z, x, y)``, from the NIfTI header; the data module passes it
on only with ``return_spacing=True`` (HD95 in mm instead of the paper's voxel units).
The default split is TransUNet's 18 training and 12 test scans.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import h5py
import numpy as np

from lomix_lightning.data.components.validation import check_label_range
from lomix_lightning.errors import LomixMissingDependencyError, LomixUserError

__all__ = ["TRANSUNET_TEST_CASES", "TRANSUNET_TRAIN_CASES", "find_raw_cases", "prepare_synapse"]

TRANSUNET_TRAIN_CASES = tuple(
    f"case{i:04d}" for i in (5, 6, 7, 9, 10, 21, 23, 24, 26, 27, 28, 30, 31, 33, 34, 37, 39, 40)
)
TRANSUNET_TEST_CASES = tuple(f"case{i:04d}" for i in (8, 22, 38, 36, 32, 2, 29, 3, 1, 4, 25, 35))
_IMG = re.compile(r"^img(\d+)\.nii(\.gz)?$")


def find_raw_cases(raw_dir: str | Path) -> dict[str, tuple[Path, Path]]:
    """Find ``imgXXXX.nii[.gz]`` files below ``raw_dir`` and their ``labelXXXX`` files in the sibling ``label/``.

    Args:
        raw_dir: Folder searched recursively.

    Returns:
        ``{"caseXXXX": (image path, label path)}``.

    Raises:
        FileNotFoundError: If ``raw_dir`` does not exist or holds no ``img*.nii.gz`` file.
        ValueError: If an image has no label file or a case appears twice.

    Example:
        >>> find_raw_cases("missing_folder")
        Traceback (most recent call last):
        ...
        FileNotFoundError: raw data folder not found: missing_folder
    """
    raw_dir = Path(raw_dir)
    if not raw_dir.is_dir():
        raise FileNotFoundError(f"raw data folder not found: {raw_dir}")
    cases: dict[str, tuple[Path, Path]] = {}
    for image in sorted(raw_dir.rglob("img*.nii*")):
        match = _IMG.match(image.name)
        if match is None:
            continue
        case = f"case{int(match.group(1)):04d}"
        label = image.parent.parent / "label" / image.name.replace("img", "label", 1)
        if not label.is_file():
            raise LomixUserError(f"no label file for {image} (expected {label})")
        if case in cases:
            raise LomixUserError(f"{case} found twice: {cases[case][0]} and {image}")
        cases[case] = (image, label)
    if not cases:
        raise FileNotFoundError(f"no imgXXXX.nii.gz files found below {raw_dir}")
    return cases


def _load_case(image_path: Path, label_path: Path, hu_min: float, hu_max: float, nib) -> tuple[np.ndarray, ...]:
    image_nii, label_nii = nib.load(str(image_path)), nib.load(str(label_path))
    image = np.asarray(image_nii.get_fdata(), dtype=np.float64)
    label = np.asarray(label_nii.get_fdata(), dtype=np.float64)
    if image.ndim != 3 or image.shape != label.shape:
        raise LomixUserError(f"{image_path} has shape {image.shape} but {label_path} has {label.shape}")
    check_label_range(label, 14, label_path)  # the 13 organs of the raw BTCV labels and background
    image = (np.clip(image, hu_min, hu_max) - hu_min) / (hu_max - hu_min)
    zooms = np.asarray(image_nii.header.get_zooms()[:3], dtype=np.float32)
    # (x, y, z) -> (z, x, y), as the reference preprocessing.
    image = np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32)
    label = np.ascontiguousarray(label.transpose(2, 0, 1), dtype=np.uint8)
    return image, label, zooms[[2, 0, 1]]


def _write_volume(path: Path, image: np.ndarray, label: np.ndarray, spacing: np.ndarray) -> None:
    """One ``.npy.h5`` volume file: image, label and spacing along the stored axes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.create_dataset("image", data=image)
        f.create_dataset("label", data=label)
        f.create_dataset("spacing", data=spacing)


def prepare_synapse(
    raw_dir: str,
    out_dir: str,
    train_cases: Sequence[str] = TRANSUNET_TRAIN_CASES,
    test_cases: Sequence[str] = TRANSUNET_TEST_CASES,
    list_dir: str | None = None,
    hu_min: float = -125.0,
    hu_max: float = 275.0,
    verbose: bool = True,
    train_volumes: bool = False,
) -> dict[str, int]:
    """Write the training slices, test volumes and list files (see the module docstring).

    Args:
        raw_dir: Folder with the raw ``img``/``label`` NIfTI folders (searched recursively).
        out_dir: Output root (``root`` of ``SynapseDataModule``).
        train_cases: Cases saved as slices.
        test_cases: Cases saved as volumes.
        list_dir: Where to write ``train.txt``/``test_vol.txt`` (default ``out_dir/lists``).
        hu_min: Lower HU clip.
        hu_max: Upper HU clip.
        verbose: Print one line per case.
        train_volumes: Also write each training case as a whole volume to ``train_vol_h5/`` (for 3-D training with
            :class:`~lomix_lightning.data.synapse_volumes.SynapseVolumesDataModule`).

    Returns:
        ``{"train_cases", "train_slices", "test_cases"}`` counts.

    Raises:
        ImportError: If nibabel is not installed (``pip install lomix-lightning[nifti]``).
        ValueError: If a case is in both lists, a listed case is not found, ``hu_min >= hu_max``, or a file is bad.

    Example:
        >>> prepare_synapse("raw", "out", train_cases=["case0001"], test_cases=["case0001"])
        Traceback (most recent call last):
        ...
        lomix_lightning.errors.LomixUserError: cases in both train_cases and test_cases: ['case0001']
    """
    overlap = sorted(set(train_cases) & set(test_cases))
    if overlap:
        raise LomixUserError(f"cases in both train_cases and test_cases: {overlap}")
    if not hu_min < hu_max:
        raise LomixUserError(f"`hu_min` must be below `hu_max`, got {hu_min} and {hu_max}")
    try:
        import nibabel as nib
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise LomixMissingDependencyError("prepare_synapse needs nibabel: pip install lomix-lightning[nifti]") from err
    found = find_raw_cases(raw_dir)
    missing = sorted((set(train_cases) | set(test_cases)) - set(found))
    if missing:
        raise LomixUserError(f"cases not found below {raw_dir}: {missing} (found {sorted(found)})")
    out = Path(out_dir)
    lists = Path(list_dir) if list_dir is not None else out / "lists"
    for folder in (out / "train_npz", out / "test_vol_h5", lists):
        folder.mkdir(parents=True, exist_ok=True)
    slice_names: list[str] = []
    for case in train_cases:
        image, label, spacing = _load_case(*found[case], hu_min, hu_max, nib)
        if train_volumes:  # 3-D training: the whole volume too
            _write_volume(out / "train_vol_h5" / f"{case}.npy.h5", image, label, spacing)
        for k in range(image.shape[0]):
            name = f"{case}_slice{k:03d}"
            np.savez(out / "train_npz" / f"{name}.npz", image=image[k], label=label[k])
            slice_names.append(name)
        if verbose:
            print(f"train {case}: {image.shape[0]} slices")
    for case in test_cases:
        image, label, spacing = _load_case(*found[case], hu_min, hu_max, nib)
        _write_volume(out / "test_vol_h5" / f"{case}.npy.h5", image, label, spacing)
        if verbose:
            print(f"test  {case}: volume {image.shape}")
    (lists / "train.txt").write_text("".join(f"{n}\n" for n in slice_names))
    (lists / "test_vol.txt").write_text("".join(f"{c}\n" for c in test_cases))
    return {"train_cases": len(train_cases), "train_slices": len(slice_names), "test_cases": len(test_cases)}
