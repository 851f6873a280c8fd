"""Per-class Dice, HD95 and IoU of one case (a 2-D image or a 3-D volume), with an explicit empty-mask rule.

Empty-mask rules (``rule``), for a class with prediction :math:`P` and ground truth :math:`G`:

==============  ======================  =========================  ======================
case            ``"transunet"``         ``"nan"``                  (dice, hd95, iou)
==============  ======================  =========================  ======================
P, G non-empty  real values             real values
P non-empty,    (1, 0, 1)               (0, nan, 0)
G empty
P empty,        (0, 0, 0)               (0, nan, 0)
G non-empty
both empty      (0, 0, 0)               (nan, nan, nan)
==============  ======================  =========================  ======================

``"transunet"`` is the convention of TransUNet/EMCAD/LoMix (``calculate_metric_percase``): a false positive on an
absent organ counts as perfect and a missed organ gets an optimistic HD95 of 0. Use it to compare with those papers;
use ``"nan"`` (then average with ``nanmean``) for an unbiased report.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from scipy.ndimage import find_objects

from lomix_lightning.metrics.hd95 import hd95

__all__ = ["EmptyRule", "binary_case_metrics", "per_class_metrics"]

EmptyRule = Literal["transunet", "nan"]


def _to_numpy(x: np.ndarray | torch.Tensor) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _as_labels(x: np.ndarray, name: str) -> np.ndarray:
    if np.issubdtype(x.dtype, np.integer):
        return x
    if np.issubdtype(x.dtype, np.bool_):
        return x.astype(np.int64)
    if np.issubdtype(x.dtype, np.floating) and np.array_equal(x, np.round(x)):
        return x.astype(np.int64)
    raise ValueError(f"`{name}` must hold integer class ids, got dtype {x.dtype}")


def _union_box(a: tuple[slice, ...] | None, b: tuple[slice, ...] | None, ndim: int) -> tuple[slice, ...]:
    """Union of two bounding boxes (``None`` = empty), grown by one voxel on each side (clipped at 0)."""
    boxes = [box for box in (a, b) if box is not None]
    if not boxes:
        return tuple(slice(0, 0) for _ in range(ndim))  # the class is absent from both: an empty crop
    return tuple(
        slice(max(min(bx[d].start for bx in boxes) - 1, 0), max(bx[d].stop for bx in boxes) + 1) for d in range(ndim)
    )


def binary_case_metrics(
    pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float] | None = None, rule: EmptyRule = "transunet"
) -> tuple[float, float, float]:
    """Dice, HD95 and IoU of one binary mask pair under ``rule`` (see the module docstring).

    Args:
        pred: Predicted binary mask.
        gt: Ground-truth binary mask of the same shape.
        spacing: Voxel size per axis for HD95 (``None`` = voxel units).
        rule: ``"transunet"`` or ``"nan"``.

    Returns:
        ``(dice, hd95, iou)``.

    Raises:
        ValueError: If ``rule`` is unknown or the shapes differ.

    Example:
        >>> p = np.zeros((4, 4), bool); p[:2] = True
        >>> g = np.zeros((4, 4), bool); g[:1] = True
        >>> binary_case_metrics(p, g)  # dice 2*4/(8+4), hd95 1, iou 4/8
        (0.6666666666666666, 1.0, 0.5)
        >>> binary_case_metrics(p, np.zeros((4, 4)), rule="nan")
        (0.0, nan, 0.0)
    """
    if rule not in ("transunet", "nan"):
        raise ValueError(f"`rule` must be 'transunet' or 'nan', got {rule!r}")
    pred, gt = _to_numpy(pred).astype(bool), _to_numpy(gt).astype(bool)
    if pred.shape != gt.shape:
        raise ValueError(f"`pred` and `gt` must have the same shape, got {pred.shape} and {gt.shape}")
    p_sum, g_sum = int(pred.sum()), int(gt.sum())
    if p_sum and g_sum:
        inter = int(np.logical_and(pred, gt).sum())
        return 2.0 * inter / (p_sum + g_sum), hd95(pred, gt, spacing), inter / (p_sum + g_sum - inter)
    if rule == "transunet":
        return (1.0, 0.0, 1.0) if p_sum else (0.0, 0.0, 0.0)
    if p_sum or g_sum:
        return 0.0, float("nan"), 0.0
    return float("nan"), float("nan"), float("nan")


def per_class_metrics(
    pred_labels: np.ndarray | torch.Tensor,
    gt_labels: np.ndarray | torch.Tensor,
    num_classes: int,
    spacing: Sequence[float] | None = None,
    rule: EmptyRule = "transunet",
    include_background: bool = False,
) -> dict[str, np.ndarray]:
    """Per-class Dice, HD95 and IoU of one label map (2-D) or label volume (3-D).

    Args:
        pred_labels: Predicted class ids, e.g. ``(D, H, W)``.
        gt_labels: Ground-truth class ids, same shape.
        num_classes: Number of classes including background.
        spacing: Voxel size per axis for HD95; ``None`` = voxel units (the reference).
        rule: Empty-mask rule, ``"transunet"`` or ``"nan"``.
        include_background: Also score class 0.

    Returns:
        ``{"dice": ..., "hd95": ..., "iou": ...}``, float64 arrays over classes ``1..C-1`` (``0..C-1`` with
        ``include_background``).

    Raises:
        ValueError: If the shapes differ, the labels are not integers, ``num_classes < 2`` or ``rule`` is unknown.

    Example:
        >>> gt = np.zeros((2, 6, 6), int); gt[:, 1:3, 1:3] = 1; gt[:, 4:, 4:] = 2
        >>> pred = gt.copy(); pred[:, 4:, 4:] = 0  # class 2 missed
        >>> m = per_class_metrics(pred, gt, num_classes=3)
        >>> m["dice"].tolist(), m["hd95"].tolist()
        ([1.0, 0.0], [0.0, 0.0])
    """
    pred, gt = _to_numpy(pred_labels), _to_numpy(gt_labels)
    if pred.shape != gt.shape:
        raise ValueError(f"`pred_labels` and `gt_labels` must have the same shape, got {pred.shape} and {gt.shape}")
    if num_classes < 2:
        raise ValueError(f"`num_classes` must be >= 2, got {num_classes}")
    if rule not in ("transunet", "nan"):
        raise ValueError(f"`rule` must be 'transunet' or 'nan', got {rule!r}")
    pred, gt = _as_labels(pred, "pred_labels"), _as_labels(gt, "gt_labels")
    # One pass per volume for the per-class bounding boxes; each class is then scored on the union box plus a
    # one-voxel margin, which changes no value (see hd95._crop_to_union) and avoids full-volume work per class.
    boxes_pred = find_objects(np.clip(pred, 0, None), max_label=num_classes - 1)
    boxes_gt = find_objects(np.clip(gt, 0, None), max_label=num_classes - 1)
    rows = []
    for c in range(0 if include_background else 1, num_classes):
        if c == 0:
            box = tuple(slice(None) for _ in pred.shape)
        else:
            box = _union_box(boxes_pred[c - 1], boxes_gt[c - 1], pred.ndim)
        rows.append(binary_case_metrics(pred[box] == c, gt[box] == c, spacing, rule))
    values = np.asarray(rows, dtype=np.float64).reshape(len(rows), 3)  # (classes, [dice, hd95, iou])
    return {"dice": values[:, 0], "hd95": values[:, 1], "iou": values[:, 2]}
