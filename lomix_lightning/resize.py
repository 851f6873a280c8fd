"""The one resize of logit maps: bilinear for 2-D maps, trilinear for 3-D maps (``align_corners=False``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor

__all__ = ["resize_logits"]

_MODES = {4: "bilinear", 5: "trilinear"}


def resize_logits(logits: Tensor, size: Sequence[int]) -> Tensor:
    """Resize ``(B, C, *spatial)`` logits to ``size`` (bilinear in 2-D, trilinear in 3-D); a no-op at that size.

    Args:
        logits: A ``(B, C, H, W)`` or ``(B, C, D, H, W)`` map.
        size: The target spatial size, one entry per spatial dimension.

    Returns:
        The map at ``size`` (the same tensor when it already has that size).

    Raises:
        ValueError: If ``logits`` is neither 4-D nor 5-D, or ``size`` has another number of dimensions.

    Example:
        >>> import torch
        >>> resize_logits(torch.zeros(1, 2, 4, 4), (8, 8)).shape
        torch.Size([1, 2, 8, 8])
        >>> resize_logits(torch.zeros(1, 2, 2, 4, 4), (4, 8, 8)).shape
        torch.Size([1, 2, 4, 8, 8])
    """
    size = tuple(int(s) for s in size)
    if logits.dim() not in _MODES:
        raise ValueError(f"logits must be (B, C, H, W) or (B, C, D, H, W), got shape {tuple(logits.shape)}")
    if len(size) != logits.dim() - 2:
        raise ValueError(
            f"size {size} has {len(size)} dimensions but the logits {tuple(logits.shape)} have {logits.dim() - 2}"
        )
    if tuple(logits.shape[2:]) == size:
        return logits
    return F.interpolate(logits, size=size, mode=_MODES[logits.dim()], align_corners=False)
