"""Reading arrays from ``.npz`` and HDF5 files, with errors that name the file and the missing key."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import h5py
import numpy as np

from lomix_lightning.data.components.validation import check_label_range
from lomix_lightning.errors import LomixUserError

__all__ = ["load_arrays", "map_labels", "optional_array"]


def load_arrays(path: str | Path, keys: Sequence[str], optional: Sequence[str] = ()) -> dict[str, np.ndarray]:
    """Load the named arrays from an ``.npz`` file or an HDF5 file (``.h5``/``.hdf5``).

    Args:
        path: The file.
        keys: Required keys.
        optional: Keys loaded when present.

    Returns:
        ``{key: array}`` for the required keys and the optional keys found.

    Raises:
        FileNotFoundError: If the file does not exist.
        ValueError: If a required key is missing (the message names the file and the keys found) or the file
            cannot be read.

    Example:
        >>> import tempfile, os
        >>> with tempfile.TemporaryDirectory() as d:
        ...     p = os.path.join(d, "a.npz")
        ...     np.savez(p, image=np.zeros((2, 2)), label=np.ones((2, 2)))
        ...     sorted(load_arrays(p, ["image", "label"]))
        ['image', 'label']
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    wanted = list(keys) + list(optional)
    try:
        if path.suffix in (".h5", ".hdf5"):
            with h5py.File(path, "r") as f:
                found = list(f.keys())
                data = {k: np.asarray(f[k][()]) for k in wanted if k in f}
        else:
            with np.load(path, allow_pickle=False) as f:
                found = list(f.files)
                data = {k: np.asarray(f[k]) for k in wanted if k in f.files}
    except (OSError, ValueError) as err:
        raise LomixUserError(f"cannot read {path}: {err}") from err
    missing = [k for k in keys if k not in data]
    if missing:
        raise LomixUserError(f"{path}: missing key(s) {missing}; keys in the file: {found}")
    return data


def optional_array(data: dict[str, np.ndarray], key: str) -> np.ndarray | None:
    """``data[key]`` as float32, or ``None`` when absent.

    Args:
        data: Arrays from :func:`load_arrays`.
        key: The key.

    Returns:
        The array or ``None``.

    Example:
        >>> optional_array({"spacing": np.array([1, 2, 3])}, "spacing").dtype
        dtype('float32')
    """
    return None if key not in data else np.asarray(data[key], dtype=np.float32)


def map_labels(label: np.ndarray, num_classes: int, source: str | Path, lut: np.ndarray | None = None) -> np.ndarray:
    """Check a label map, optionally remap its ids through ``lut``, and return it as ``uint8``.

    Args:
        label: Label map of any numeric dtype (float files from the reference preprocessing are fine).
        num_classes: Classes after remapping, including background.
        source: File name for error messages.
        lut: Optional lookup table: input id ``i`` becomes ``lut[i]``.

    Returns:
        The (remapped) label map, ``uint8``.

    Raises:
        ValueError: If ids are non-integer or outside ``[0, len(lut))`` (before remapping) or
            ``[0, num_classes)`` (after).

    Example:
        >>> lut = np.array([0, 1, 2, 3, 4, 0, 6, 7, 8, 0, 0, 5, 0, 0])
        >>> map_labels(np.array([[0.0, 11.0], [5.0, 8.0]]), 9, "x", lut=lut)
        array([[0, 5],
               [0, 8]], dtype=uint8)
    """
    if num_classes > 256:
        raise LomixUserError(f"`num_classes` must be <= 256, got {num_classes}")
    if lut is not None:
        check_label_range(label, len(lut), source)
        label = lut[label.astype(np.int64)]
    check_label_range(label, num_classes, source)
    return label.astype(np.uint8)
