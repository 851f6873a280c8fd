"""Slice-wise prediction of a whole volume and its per-case 3-D metrics (the Synapse/ACDC test protocol)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from lomix_lightning.metrics.per_class import EmptyRule, per_class_metrics

__all__ = ["evaluate_volume", "predict_volume"]


@torch.no_grad()
def predict_volume(
    predict_slices: Callable[[Tensor], Tensor], volume: Tensor, img_size: int, batch_size: int = 16
) -> Tensor:
    """Predict a label volume slice by slice at the network resolution and map it back to the original grid.

    Each axial slice ``(H0, W0)`` is resized to ``img_size`` with bicubic interpolation (``align_corners=False``,
    the same kernel and pixel-centre convention as the ``cv2.INTER_CUBIC`` resize used in training; the reference
    uses ``scipy.ndimage.zoom(order=3)``), the slices go through ``predict_slices`` in batches, the logits are
    arg-maxed (or thresholded at 0 when there is a single channel), and the label maps are resized back to
    ``(H0, W0)`` with ``nearest-exact``.

    Args:
        predict_slices: Maps ``(b, 1, img_size, img_size)`` float32 slices (on ``volume``'s device) to logits
            ``(b, C, img_size, img_size)``; e.g. ``lambda x: model(x.to(device))[-1]``.
        volume: ``(D, H0, W0)`` image volume (``(1, D, H0, W0)`` from a batch-size-1 loader is accepted).
        img_size: Network input side length.
        batch_size: Slices per call.

    Returns:
        ``(D, H0, W0)`` int64 labels on ``volume``'s device.

    Raises:
        ValueError: If ``volume`` is not 3-D, ``img_size``/``batch_size`` are not positive, or the logits have the
            wrong shape.

    Example:
        >>> vol = torch.zeros(3, 20, 20); vol[:, 5:15, 5:15] = 1.0
        >>> to_logits = lambda x: torch.cat([0.5 - x, x - 0.5], dim=1)  # class 1 where the image is bright
        >>> bool((predict_volume(to_logits, vol, img_size=40) == vol.long()).all())
        True
    """
    if volume.ndim == 4 and volume.shape[0] == 1:
        volume = volume[0]
    if volume.ndim != 3:
        raise ValueError(f"`volume` must be (D, H, W), got shape {tuple(volume.shape)}")
    if img_size < 1 or batch_size < 1:
        raise ValueError(f"`img_size` and `batch_size` must be positive, got {img_size} and {batch_size}")
    depth, height, width = volume.shape
    out = torch.empty((depth, height, width), dtype=torch.int64, device=volume.device)
    for start in range(0, depth, batch_size):
        chunk = volume[start : start + batch_size, None].float()  # (b, H0, W0) -> (b, 1, H0, W0)
        if (height, width) != (img_size, img_size):
            chunk = F.interpolate(chunk, size=(img_size, img_size), mode="bicubic", align_corners=False)
        logits = predict_slices(chunk)
        if logits.ndim != 4 or logits.shape[0] != chunk.shape[0] or logits.shape[-2:] != chunk.shape[-2:]:
            raise ValueError(
                f"`predict_slices` must return (b, C, {img_size}, {img_size}) logits for b={chunk.shape[0]} slices, "
                f"got {tuple(logits.shape)}"
            )
        labels = (logits[:, 0] > 0).long() if logits.shape[1] == 1 else logits.argmax(dim=1)  # (b, S, S)
        if (height, width) != (img_size, img_size):
            labels = F.interpolate(labels[:, None].float(), size=(height, width), mode="nearest-exact")[:, 0]
        out[start : start + chunk.shape[0]] = labels.to(device=volume.device, dtype=torch.int64)
    return out


def evaluate_volume(
    predict_slices: Callable[[Tensor], Tensor],
    volume: Tensor,
    label: Tensor,
    num_classes: int,
    img_size: int,
    spacing: Sequence[float] | None = None,
    rule: EmptyRule = "transunet",
    batch_size: int = 16,
) -> dict[str, np.ndarray]:
    """:func:`predict_volume`, then :func:`~lomix_lightning.metrics.per_class_metrics` on the whole 3-D case.

    Args:
        predict_slices: See :func:`predict_volume`.
        volume: ``(D, H0, W0)`` image volume.
        label: ``(D, H0, W0)`` ground-truth ids.
        num_classes: Classes including background.
        img_size: Network input side length.
        spacing: Voxel size per axis for HD95; ``None`` = voxel units (as the reference).
        rule: Empty-mask rule.
        batch_size: Slices per call.

    Returns:
        ``{"dice", "hd95", "iou"}`` arrays over the foreground classes.

    Example:
        >>> vol = torch.zeros(2, 8, 8); vol[:, 2:6, 2:6] = 1.0
        >>> to_logits = lambda x: torch.cat([0.5 - x, x - 0.5], dim=1)
        >>> evaluate_volume(to_logits, vol, vol.long(), num_classes=2, img_size=8)["dice"].tolist()
        [1.0]
    """
    if label.ndim == 4 and label.shape[0] == 1:
        label = label[0]
    pred = predict_volume(predict_slices, volume, img_size, batch_size)
    return per_class_metrics(pred, label, num_classes, spacing=spacing, rule=rule)
