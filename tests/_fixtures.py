"""Test helper (not collected): dataset fixtures written in the exact on-disk layouts the README documents.

Each writer takes the folder the README names (``data/synapse``, ``data/ACDC``, ``data/Kvasir-SEG``, ...) and
writes a few tiny, learnable files there: the foreground is brighter than the background, so a few steps already
give non-trivial scores.
"""

from pathlib import Path

import h5py
import numpy as np
from PIL import Image

SYNAPSE_SIZE = 64


def write_synapse(
    root: Path,
    train_cases,
    test_cases=("case0001", "case0002"),
    slices: int = 3,
    labels14: bool = True,
    size: int = SYNAPSE_SIZE,
    depth: int = 8,
    train_dir: str = "train_npz",
    test_dir: str = "test_vol_h5",
    list_dir: Path | None = None,
    train_volumes: bool = False,
) -> Path:
    """Synapse: ``train_dir/<case>_slice<k>.npz``, ``test_dir/<case>.npy.h5``, ``train.txt`` and ``test_vol.txt``.

    With ``train_volumes`` also ``train_vol_h5/<case>.npy.h5`` (what ``prepare-synapse --train_volumes`` adds):
    raw 14-class ids and a ``spacing``, as the test volumes.

    ``prepare-synapse`` writes ``train_npz``, ``test_vol_h5`` and ``lists``; the TransUNet/LoMix release names them
    ``train_npz_new``, ``test_vol_h5_new`` and ``lists_Synapse``. With ``labels14`` the ids are raw BTCV ones
    (incl. 11 pancreas and 12 right adrenal gland), else 9-class ids.
    """
    list_dir = root / "lists" if list_dir is None else list_dir
    (root / train_dir).mkdir(parents=True)
    (root / test_dir).mkdir()
    list_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    scale = size / 64
    box = slice(int(10 * scale), int(30 * scale))
    names = []
    for ci, case in enumerate(train_cases):
        for k in range(slices):
            label = np.zeros((size, size))  # float64 like the reference files
            label[box, box] = 1 + (ci + k) % 8
            if labels14:
                label[int(40 * scale) : int(50 * scale), int(40 * scale) : int(50 * scale)] = 11  # pancreas -> 5
                label[int(52 * scale) : int(56 * scale), int(5 * scale) : int(9 * scale)] = 12  # adrenal -> 0
            image = 0.3 * rng.random((size, size)) + 0.6 * (label > 0)
            name = f"{case}_slice{k:03d}"
            np.savez(root / train_dir / f"{name}.npz", image=image, label=label)
            names.append(name)
    for case in test_cases:
        label = np.zeros((depth, size, size))
        label[depth // 4 : 3 * depth // 4, box, box] = 6
        label[depth // 4 + 1 : 3 * depth // 4, int(40 * scale) : int(50 * scale), int(40 * scale) : int(50 * scale)] = (
            11 if labels14 else 5
        )
        with h5py.File(root / test_dir / f"{case}.npy.h5", "w") as f:
            f.create_dataset("image", data=0.3 * rng.random((depth, size, size)) + 0.6 * (label > 0))
            f.create_dataset("label", data=label)
    for ci, case in enumerate(train_cases if train_volumes else ()):
        (root / "train_vol_h5").mkdir(exist_ok=True)
        label = np.zeros((depth, size, size), dtype=np.uint8)
        label[depth // 4 : 3 * depth // 4, box, box] = 1 + ci % 8
        label[1:, int(40 * scale) : int(50 * scale), int(40 * scale) : int(50 * scale)] = 11  # pancreas -> 5
        with h5py.File(root / "train_vol_h5" / f"{case}.npy.h5", "w") as f:
            f.create_dataset(
                "image", data=(0.3 * rng.random((depth, size, size)) + 0.6 * (label > 0)).astype(np.float32)
            )
            f.create_dataset("label", data=label)
            f.create_dataset("spacing", data=np.array([3.0, 0.8, 0.8], dtype=np.float32))
    (list_dir / "train.txt").write_text("\n".join(names) + "\n")
    (list_dir / "test_vol.txt").write_text("\n".join(test_cases) + "\n")
    return root


def write_acdc(
    root: Path,
    with_lists: bool = True,
    list_subdir: str = "lists_ACDC",
    counts=(6, 2, 2),
    shape=(48, 40),
    depth: int = 8,
    volume_shape=(50, 44),
) -> Path:
    """The ACDC layout: ``{train,valid}/*.npz`` slices and ``test/*.npz`` volumes (keys ``img``, ``label``) + lists."""
    rng = np.random.default_rng(0)
    names = {"train": [], "valid": [], "test": []}

    def label_map(*lead: int, size=shape) -> np.ndarray:
        height, width = size
        label = np.zeros((*lead, height, width))
        label[..., height // 10 : height * 4 // 10, width // 8 : width // 2] = 1
        label[..., height // 2 : height * 6 // 10, width // 4 : width * 7 // 8] = 2
        label[..., height * 7 // 10 : height * 9 // 10, width // 2 : width * 3 // 4] = 3
        return label

    for split, count in (("train", counts[0]), ("valid", counts[1])):
        (root / split).mkdir(parents=True)
        for i in range(count):
            label = label_map()
            name = f"patient{i:03d}_frame01_slice_{i}.npz"
            np.savez(root / split / name, img=0.3 * rng.random(shape) + 0.2 * label, label=label)
            names[split].append(name)
    (root / "test").mkdir()
    for i in range(counts[2]):
        label = label_map(depth, size=volume_shape)  # test volumes: another in-plane size than the slices
        label[: depth // 4] = 0
        name = f"case_{i:03d}_volume_ED.npz"
        np.savez(root / "test" / name, img=0.3 * rng.random(label.shape) + 0.2 * label, label=label)
        names["test"].append(name)
    if with_lists:
        (root / list_subdir).mkdir(exist_ok=True)
        for split, entries in names.items():
            (root / list_subdir / f"{split}.txt").write_text("\n".join(entries) + "\n")
    return root


def _lesion(i: int, size: int) -> np.ndarray:
    """A bright ellipse that moves with ``i`` (uint8 0/255)."""
    yy, xx = np.mgrid[:size, :size]
    cy, cx = size * (0.35 + 0.05 * (i % 4)), size * (0.4 + 0.04 * (i % 5))
    inside = ((yy - cy) / (0.22 * size)) ** 2 + ((xx - cx) / (0.18 * size)) ** 2 <= 1
    return (inside * 255).astype(np.uint8)


def _rgb(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    noise = rng.integers(0, 60, (*mask.shape, 3))
    return np.clip(noise + 40 + (mask[..., None] > 0) * 150, 0, 255).astype(np.uint8)


def write_kvasir(root: Path, n: int = 10, size: int = 48) -> tuple[Path, Path]:
    """Kvasir-SEG: ``images/<id>.jpg`` and ``masks/<id>.jpg`` (JPEG masks, as released)."""
    rng = np.random.default_rng(1)
    images, masks = root / "images", root / "masks"
    images.mkdir(parents=True)
    masks.mkdir()
    for i in range(n):
        name = f"cju{i:04d}kwl35piu0993l0dewei{i}"
        mask = _lesion(i, size)
        Image.fromarray(_rgb(mask, rng)).save(images / f"{name}.jpg", quality=95)
        Image.fromarray(mask).convert("RGB").save(masks / f"{name}.jpg", quality=95)
    return images, masks


def write_clinicdb(root: Path, n: int = 10, size: int = 48) -> tuple[Path, Path]:
    """CVC-ClinicDB: ``Original/<k>.tif`` (RGB) and ``Ground Truth/<k>.tif`` (grey), as released."""
    rng = np.random.default_rng(2)
    images, masks = root / "Original", root / "Ground Truth"
    images.mkdir(parents=True)
    masks.mkdir()
    for i in range(1, n + 1):
        mask = _lesion(i, size)
        Image.fromarray(_rgb(mask, rng)).save(images / f"{i}.tif")
        Image.fromarray(mask).save(masks / f"{i}.tif")
    return images, masks


def write_isic2018(root: Path, n: int = 10, size: int = 48) -> tuple[Path, Path]:
    """ISIC 2018 Task 1: ``..._Input/ISIC_<id>.jpg`` (+ text files), ``..._GroundTruth/ISIC_<id>_segmentation.png``."""
    rng = np.random.default_rng(3)
    images = root / "ISIC2018_Task1-2_Training_Input"
    masks = root / "ISIC2018_Task1_Training_GroundTruth"
    images.mkdir(parents=True)
    masks.mkdir()
    for folder in (images, masks):
        (folder / "ATTRIBUTION.txt").write_text("fixture\n")
        (folder / "LICENSE.txt").write_text("fixture\n")
    for i in range(n):
        mask = _lesion(i, size)
        Image.fromarray(_rgb(mask, rng)).save(images / f"ISIC_{i:07d}.jpg", quality=95)
        Image.fromarray(mask).save(masks / f"ISIC_{i:07d}_segmentation.png")
    return images, masks


def write_busi(folder: Path, n: int = 10, size: int = 48) -> Path:
    """BUSI's benign/ and malignant/ in one folder: ``benign (k).png``, ``benign (k)_mask.png`` (+ ``_mask_1``)."""
    rng = np.random.default_rng(4)
    folder.mkdir(parents=True)
    for i in range(n):
        name = f"{'benign' if i % 2 else 'malignant'} ({i + 1})"
        mask = _lesion(i, size)
        Image.fromarray(_rgb(mask, rng)[..., 0]).convert("RGB").save(folder / f"{name}.png")
        if i == 0:  # a second lesion in its own file, merged into the first mask
            extra = np.zeros_like(mask)
            extra[2:8, 2:8] = 255
            Image.fromarray(extra).save(folder / f"{name}_mask_1.png")
        Image.fromarray(mask).save(folder / f"{name}_mask.png")
    return folder
