"""Argument and label checks shared by the data modules (and importable by the module and the loss).

One integer validator (:func:`check_int`), one fraction validator, and one label-range helper
(:func:`labels_outside_range`) with the data-file check built on it (:func:`check_label_range`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from lomix_lightning.errors import LomixUserError

__all__ = [
    "check_fixed_classes",
    "check_fraction",
    "check_int",
    "check_label_range",
    "label_range_mask",
    "labels_outside_range",
]


def check_int(name: str, value: int, minimum: int) -> None:
    """Raise ``ValueError`` unless ``value`` is an ``int`` (not ``bool``) that is at least ``minimum``.

    Args:
        name: Argument name used in the message.
        value: The value to check.
        minimum: Smallest allowed value.

    Raises:
        ValueError: If ``value`` is not an integer ``>= minimum``.

    Example:
        >>> check_int("batch_size", 4, minimum=1)
    """
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise LomixUserError(f"`{name}` must be an integer >= {minimum}, got {value!r}")


def check_fraction(name: str, value: float) -> None:
    """Raise ``ValueError`` unless ``0 < value <= 1``.

    Args:
        name: Argument name used in the message.
        value: The value to check.

    Raises:
        ValueError: If ``value`` is outside ``(0, 1]``.

    Example:
        >>> check_fraction("train_fraction", 0.05)
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < float(value) <= 1.0:
        raise LomixUserError(f"`{name}` must be a number in (0, 1], got {value!r}")


def check_fixed_classes(owner: str, num_classes: int, allowed: int, meaning: Sequence[str]) -> None:
    """Raise ``ValueError`` unless ``num_classes == allowed``, for a data module whose class count is fixed.

    Args:
        owner: The data module's name, for the message.
        num_classes: The value asked for (e.g. linked from ``--model.num_classes``).
        allowed: The one value the data supports.
        meaning: What the classes are, for the message.

    Raises:
        ValueError: If ``num_classes`` differs from ``allowed``.

    Example:
        >>> check_fixed_classes("ACDCDataModule", 5, 4, ["background", "RV", "Myo", "LV"])
        Traceback (most recent call last):
        ...
        lomix_lightning.errors.LomixUserError: ACDCDataModule has num_classes=4 (background, RV, Myo, LV), got 5
    """
    if isinstance(num_classes, bool) or num_classes != allowed:
        raise LomixUserError(f"{owner} has num_classes={allowed} ({', '.join(meaning)}), got {num_classes!r}")


def label_range_mask(labels: np.ndarray | Tensor, high: int, ignore_index: int | None = None) -> np.ndarray | Tensor:
    """Boolean mask of the labels outside ``[0, high]``, not counting ``ignore_index``.

    It reads nothing to the host, so it can be used inside a compiled graph
    (e.g. ``torch._assert_async(~mask.any(), ...)``).

    Args:
        labels: Label map, NumPy array or tensor, any shape.
        high: Largest valid label id (``num_classes - 1``; ``1`` for binary masks).
        ignore_index: A label id that is allowed anyway, or ``None``.

    Returns:
        A boolean array/tensor of the shape of ``labels``.

    Example:
        >>> label_range_mask(torch.tensor([0, 3, -1, 255]), high=2, ignore_index=255).tolist()
        [False, True, True, False]
    """
    bad = (labels < 0) | (labels > high)
    if ignore_index is not None:
        bad &= labels != ignore_index
    return bad


def labels_outside_range(
    labels: np.ndarray | Tensor, high: int, ignore_index: int | None = None, limit: int = 10
) -> list[int | float]:
    """The distinct label values outside ``[0, high]`` (``ignore_index`` excepted), ascending, at most ``limit``.

    The one label-range check of the package: callers raise their own one-line error when the list is not empty.

    Args:
        labels: Label map, NumPy array or tensor, any shape.
        high: Largest valid label id (``num_classes - 1``; ``1`` for binary masks).
        ignore_index: A label id that is allowed anyway, or ``None``.
        limit: At most this many values are returned.

    Returns:
        The offending values (empty when every label is in range). For a tensor this reads one value to the host.

    Example:
        >>> labels_outside_range(np.array([[0, 5], [-1, 5]]), high=3)
        [-1, 5]
        >>> labels_outside_range(torch.tensor([0, 1, 255]), high=1, ignore_index=255)
        []
    """
    bad = label_range_mask(labels, high, ignore_index)
    if isinstance(labels, Tensor):
        return torch.unique(labels[bad])[:limit].tolist() if bool(bad.any()) else []
    return np.unique(labels[bad])[:limit].tolist()


def check_label_range(label: np.ndarray, num_classes: int, source: str | Path) -> None:
    """Raise ``ValueError`` naming ``source`` if ``label`` holds ids outside ``[0, num_classes)`` or non-integers.

    Args:
        label: Label map (any shape, any numeric dtype).
        num_classes: Number of classes including background.
        source: File (or entry) name used in the message.

    Raises:
        ValueError: If a label id is negative, ``>= num_classes`` or not integral.

    Example:
        >>> check_label_range(np.array([[0, 1], [2, 0]]), 3, "x.npz")
        >>> check_label_range(np.array([[0, 7]]), 3, "x.npz")
        Traceback (most recent call last):
        ...
        lomix_lightning.errors.LomixUserError: x.npz: label ids must lie in [0, 2], found [7]
    """
    outside = labels_outside_range(label, num_classes - 1)
    if outside:
        found = [int(x) if float(x).is_integer() else x for x in outside]
        raise LomixUserError(f"{source}: label ids must lie in [0, {num_classes - 1}], found {found}")
    if not np.issubdtype(label.dtype, np.integer) and not np.array_equal(label, np.round(label)):
        raise LomixUserError(f"{source}: label map contains non-integer values")
