"""Binary 2-D segmentation from a folder of images and a folder of masks (Kvasir, ClinicDB, ISIC2018, BUSI, ...).

Pairing rule. Image files have one of the extensions ``.png .jpg .jpeg .tif .tiff .bmp`` (any case). For an image
with stem ``s`` the mask is the file in ``masks_dir`` whose stem is, trying in this order and ignoring case,
``s``, ``s_mask``, ``s_segmentation``, ``s_seg``, ``s_gt``. Further masks named ``<mask stem>_<k>`` (BUSI's
``benign (4)_mask_1.png``) are merged into it with a logical OR. When ``images_dir == masks_dir`` (BUSI's original
layout), files whose stem ends in one of those suffixes (optionally followed by ``_<k>``) are masks, not images, and
the exact-stem rule is skipped.

Binarisation. Masks are read as grey level (colour masks are averaged over their colour channels); a pixel is
foreground when it exceeds half the dtype range (``> 127.5`` for 8-bit, ``> 0.5`` for float), except that an 8-bit
mask whose maximum is 1 is taken as already 0/1, and a palette (``P`` mode) mask is foreground where its index is
not 0.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from lomix_lightning.errors import LomixUserError

__all__ = [
    "IMAGE_EXTENSIONS",
    "MASK_SUFFIXES",
    "FolderPair",
    "load_binary_mask",
    "load_pair",
    "pair_files",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
MASK_SUFFIXES = ("", "_mask", "_segmentation", "_seg", "_gt")
_MASK_STEM = re.compile(r"_(mask|segmentation|seg|gt)(_\d+)?$", re.IGNORECASE)


@dataclass(frozen=True)
class FolderPair:
    """An image file, its mask file and any extra mask files merged into it."""

    stem: str
    image: Path
    mask: Path
    extra_masks: tuple[Path, ...] = field(default=())


def _index(folder: Path) -> dict[str, list[Path]]:
    """Lower-cased stem -> image files with that stem."""
    out: dict[str, list[Path]] = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS:
            out.setdefault(path.stem.lower(), []).append(path)
    return out


def pair_files(images_dir: str | Path, masks_dir: str | Path) -> list[FolderPair]:
    """Pair every image with its mask by the rule in the module docstring.

    Args:
        images_dir: Folder of images.
        masks_dir: Folder of masks (may be the same folder).

    Returns:
        Pairs sorted by image stem.

    Raises:
        FileNotFoundError: If a folder does not exist.
        ValueError: If the image folder holds no image, a mask stem matches two files, or some images have no mask
            (the message names up to five of them).

    Example:
        >>> import tempfile, os
        >>> d = tempfile.mkdtemp()
        >>> for name in ("a.png", "a_mask.png", "b.jpg", "b_mask.png"):
        ...     Image.new("L", (4, 4)).save(os.path.join(d, name))
        >>> [(p.stem, p.mask.name) for p in pair_files(d, d)]
        [('a', 'a_mask.png'), ('b', 'b_mask.png')]
    """
    images_dir, masks_dir = Path(images_dir), Path(masks_dir)
    for folder in (images_dir, masks_dir):
        if not folder.is_dir():
            raise FileNotFoundError(f"folder not found: {folder}")
    same = images_dir.resolve() == masks_dir.resolve()
    masks = _index(masks_dir)
    images = [p for paths in _index(images_dir).values() for p in paths]
    if same:
        images = [p for p in images if not _MASK_STEM.search(p.stem)]
    if not images:
        raise LomixUserError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) found in {images_dir}")
    pairs, unmatched = [], []
    for image in sorted(images, key=lambda p: p.stem):
        found = None
        for suffix in MASK_SUFFIXES[1:] if same else MASK_SUFFIXES:
            candidates = masks.get((image.stem + suffix).lower(), [])
            if len(candidates) > 1:
                raise LomixUserError(f"mask for {image} is ambiguous: {[str(c) for c in candidates]}")
            if candidates:
                found = candidates[0]
                break
        if found is None:
            unmatched.append(image.name)
            continue
        extra_pattern = re.compile(re.escape(found.stem.lower()) + r"_\d+$")
        extras = tuple(p for key, paths in masks.items() if extra_pattern.match(key) for p in paths)
        pairs.append(FolderPair(image.stem, image, found, extras))
    if not pairs:
        raise LomixUserError(f"no image in {images_dir} has a matching mask in {masks_dir} (suffixes {MASK_SUFFIXES})")
    if unmatched:
        raise LomixUserError(f"{len(unmatched)} image(s) in {images_dir} have no mask in {masks_dir}: {unmatched[:5]}")
    stems = [p.stem for p in pairs]
    if len(set(stems)) != len(stems):
        duplicated = sorted({s for s in stems if stems.count(s) > 1})
        raise LomixUserError(f"several images share the stem(s) {duplicated[:5]} in {images_dir}")
    return pairs


def load_binary_mask(path: str | Path) -> np.ndarray:
    """Read a mask file as ``uint8`` 0/1 by the binarisation rule in the module docstring.

    Args:
        path: Mask image file.

    Returns:
        ``(H, W)`` uint8 array of 0 and 1.

    Example:
        >>> import tempfile, os
        >>> p = os.path.join(tempfile.mkdtemp(), "m.png")
        >>> Image.fromarray(np.array([[0, 200], [100, 255]], np.uint8)).save(p)
        >>> load_binary_mask(p).tolist()
        [[0, 1], [0, 1]]
    """
    with Image.open(path) as img:
        palette = img.mode == "P"
        arr = np.asarray(img)
    if palette:  # palette indices, not intensities
        return (arr != 0).astype(np.uint8)
    dtype = arr.dtype
    if arr.ndim == 3:
        arr = arr[..., :3].mean(axis=-1)  # colour (+ alpha) -> grey: average the colour channels
    if dtype == np.bool_:
        return arr.astype(np.uint8)
    if np.issubdtype(dtype, np.integer):
        if dtype == np.uint8 and arr.max() <= 1:
            return (arr > 0).astype(np.uint8)
        return (arr > np.iinfo(dtype).max / 2).astype(np.uint8)
    return (arr > 0.5).astype(np.uint8)


def _read(path: Path, read):
    """``read(path)``, with an unreadable image file (corrupt, truncated, not an image) named in one line."""
    try:
        return read(path)
    except (OSError, SyntaxError, ValueError) as error:  # PIL: UnidentifiedImageError, truncated data, bad header
        raise LomixUserError(f"cannot read the image file {path}: {error}") from error


def _read_rgb(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def load_pair(pair: FolderPair) -> tuple[np.ndarray, np.ndarray]:
    """Read one pair: the RGB image ``(H, W, 3) uint8`` and its 0/1 mask ``(H, W) uint8`` (extra masks OR-ed in).

    Raises:
        ValueError: If a file cannot be read or the sizes differ (naming the files).
    """
    image = _read(pair.image, _read_rgb)
    mask = _read(pair.mask, load_binary_mask)
    for extra in pair.extra_masks:
        extra_mask = _read(extra, load_binary_mask)
        if extra_mask.shape != mask.shape:
            raise LomixUserError(f"mask {extra} has size {extra_mask.shape}, but {pair.mask} has {mask.shape}")
        mask |= extra_mask
    if image.shape[:2] != mask.shape:
        raise LomixUserError(f"image {pair.image} has size {image.shape[:2]} but its mask {pair.mask} has {mask.shape}")
    return image, mask
