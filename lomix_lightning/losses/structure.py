"""The "structure" loss of PraNet-style binary segmentation: weighted BCE + weighted IoU (paper A.5)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lomix_lightning.losses.precision import full_precision, fusion_dtype


def boundary_weight(mask: Tensor) -> Tensor:
    """Pixel weight ``1 + 5 * |avg_pool(mask, 31, stride 1, pad 15) - mask|``: large near object boundaries.

    Args:
        mask: ``(B, 1, H, W)`` binary mask as floats.
    """
    return 1.0 + 5.0 * (F.avg_pool2d(mask, kernel_size=31, stride=1, padding=15) - mask).abs()


def structure_loss(logits: Tensor | Sequence[Tensor], target: Tensor) -> Tensor:
    """Weighted binary cross-entropy + weighted IoU, 1:1, with the boundary weight of :func:`boundary_weight`.

    Both terms are computed per image and averaged over the batch. Unlike PraNet's public code, whose
    ``F.binary_cross_entropy_with_logits(..., reduce='none')`` silently falls back to the mean and so ignores the
    pixel weight, the BCE term here really is weighted (see the README). It runs in at least float32 whatever the
    input dtype and autocast.

    Args:
        logits: ``(B, 1, H, W)`` for one map; ``(B, M, 1, H, W)`` or a list of ``M`` maps ``(B, 1, H, W)``.
        target: ``(B, H, W)`` or ``(B, 1, H, W)`` mask with values in ``[0, 1]``.

    Returns:
        A scalar for one map, else the ``(M,)`` per-map losses.

    Example:
        >>> import torch
        >>> mask = torch.zeros(1, 8, 8); mask[:, 2:6, 2:6] = 1
        >>> good, bad = 20 * (2 * mask - 1)[:, None], -20 * (2 * mask - 1)[:, None]
        >>> bool(structure_loss(good, mask) < 0.01 < structure_loss(bad, mask))
        True
    """
    device = logits.device if isinstance(logits, Tensor) else logits[0].device
    with full_precision(device):  # float32 at least, autocast or not
        return _structure_loss(logits, target)


def _structure_loss(logits: Tensor | Sequence[Tensor], target: Tensor) -> Tensor:
    if not isinstance(logits, Tensor):
        logits = torch.stack(list(logits), dim=1)  # M x (B, 1, H, W) -> (B, M, 1, H, W)
    logits = logits.to(fusion_dtype(logits.dtype))
    single = logits.ndim == 4
    if single:
        logits = logits.unsqueeze(1)
    if target.ndim == 3:
        target = target[:, None]
    mask = target.to(logits.dtype)  # (B, 1, H, W)
    weight = boundary_weight(mask)[:, None]  # (B, 1, 1, H, W), broadcast over the maps
    mask = mask[:, None]  # (B, 1, 1, H, W)
    dims = (2, 3, 4)
    bce = F.binary_cross_entropy_with_logits(logits, mask.expand_as(logits), reduction="none")
    weighted_bce = (weight * bce).sum(dims) / weight.sum(dims)  # (B, M)
    prob = logits.sigmoid()
    intersection = (prob * mask * weight).sum(dims)
    union = ((prob + mask) * weight).sum(dims)
    weighted_iou = 1.0 - (intersection + 1.0) / (union - intersection + 1.0)  # (B, M)
    loss = (weighted_bce + weighted_iou).mean(dim=0)  # (M,)
    return loss[0] if single else loss


class StructureLoss(nn.Module):
    """Module form of :func:`structure_loss`."""

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        """See :func:`structure_loss`."""
        return structure_loss(logits, target)
