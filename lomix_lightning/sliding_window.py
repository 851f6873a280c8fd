"""Whole-volume prediction with MONAI's ``sliding_window_inference``: the options and the one call the module makes."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Literal, TypedDict

from torch import Tensor

from lomix_lightning.errors import LomixUserError

__all__ = ["SlidingWindow", "batch_spacings", "check_sliding_window", "sliding_window_logits"]

_KEYS = ("roi_size", "overlap", "mode", "sw_batch_size")


class SlidingWindow(TypedDict, total=False):
    """Sliding-window options (a plain dict, so checkpoints keep plain data).

    Attributes:
        roi_size: Window size per spatial dimension (one int for a cube); required.
        overlap: Fraction of overlap between windows, in ``[0, 1)`` (default 0.25).
        mode: ``"constant"`` (plain average of overlapping windows) or ``"gaussian"`` (centre-weighted; default).
        sw_batch_size: Windows per network call (default 1).
    """

    roi_size: int | list[int]
    overlap: float
    mode: Literal["constant", "gaussian"]
    sw_batch_size: int


def check_sliding_window(options: Mapping[str, object] | None) -> SlidingWindow | None:
    """Validate sliding-window options and fill the defaults; ``None`` stays ``None`` (no sliding window).

    Raises:
        ValueError: On an unknown key, a missing or non-positive ``roi_size``, an overlap outside ``[0, 1)``, an
            unknown mode or a non-positive ``sw_batch_size`` (the message names the value).

    Example:
        >>> check_sliding_window({"roi_size": 32})
        {'roi_size': 32, 'overlap': 0.25, 'mode': 'gaussian', 'sw_batch_size': 1}
        >>> check_sliding_window({"roi_size": 32, "overlap": 1.0})
        Traceback (most recent call last):
        ...
        lomix_lightning.errors.LomixUserError: sliding_window.overlap must be in [0, 1), got 1.0
    """
    if options is None:
        return None
    if not isinstance(options, Mapping):
        raise LomixUserError(f"sliding_window must be a dict with keys {list(_KEYS)}, got {type(options).__name__}")
    unknown = sorted(set(options) - set(_KEYS))
    if unknown:
        raise LomixUserError(f"sliding_window has unknown keys {unknown}; allowed are {list(_KEYS)}")
    full = {"overlap": 0.25, "mode": "gaussian", "sw_batch_size": 1, **options}
    roi = full.get("roi_size")
    sizes = [roi] if isinstance(roi, int) else roi
    if not isinstance(sizes, Sequence) or not sizes or not all(isinstance(s, int) and s > 0 for s in sizes):
        raise LomixUserError(f"sliding_window.roi_size must be a positive int or a list of them, got {roi!r}")
    if not isinstance(full["overlap"], (int, float)) or not 0 <= full["overlap"] < 1:
        raise LomixUserError(f"sliding_window.overlap must be in [0, 1), got {full['overlap']!r}")
    if full["mode"] not in ("constant", "gaussian"):
        raise LomixUserError(f"sliding_window.mode must be 'constant' or 'gaussian', got {full['mode']!r}")
    if (
        isinstance(full["sw_batch_size"], bool)
        or not isinstance(full["sw_batch_size"], int)
        or full["sw_batch_size"] < 1
    ):
        raise LomixUserError(f"sliding_window.sw_batch_size must be a positive int, got {full['sw_batch_size']!r}")
    return SlidingWindow(
        roi_size=roi if isinstance(roi, int) else list(roi),
        overlap=float(full["overlap"]),
        mode=full["mode"],
        sw_batch_size=full["sw_batch_size"],
    )


def sliding_window_logits(predictor: Callable[[Tensor], Tensor], image: Tensor, options: SlidingWindow) -> Tensor:
    """Logits ``(B, C, *spatial)`` of a whole image or volume, predicted window by window and blended.

    Args:
        predictor: Maps a ``(n, C_in, *roi)`` batch of windows to prediction logits at the window size.
        image: ``(B, C_in, *spatial)``; a spatial size below ``roi_size`` is padded by MONAI.
        options: Checked options (:func:`check_sliding_window`).

    Example:
        >>> import torch
        >>> x = torch.randn(1, 1, 20, 20, 20)
        >>> out = sliding_window_logits(lambda w: 2 * w, x, check_sliding_window({"roi_size": 8, "overlap": 0.5}))
        >>> torch.allclose(out, 2 * x, atol=1e-5)
        True
    """
    from lomix_lightning.models.monai import require_monai

    inferers = require_monai().inferers
    spatial = image.ndim - 2
    roi = options["roi_size"]
    roi_size = [roi] * spatial if isinstance(roi, int) else list(roi)
    if len(roi_size) != spatial:
        raise LomixUserError(f"sliding_window.roi_size {roi!r} has {len(roi_size)} sizes but the input has {spatial}")
    return inferers.sliding_window_inference(
        image,
        roi_size=roi_size,
        sw_batch_size=options["sw_batch_size"],
        predictor=predictor,
        overlap=options["overlap"],
        mode=options["mode"],
    )


def batch_spacings(batch: Mapping[str, object], count: int) -> list[list[float] | None]:
    """Each image's voxel spacing from a batch's optional ``"spacing"`` (``(B, dims)`` or one ``(dims,)``).

    Example:
        >>> import torch
        >>> batch_spacings({"spacing": torch.tensor([[2.0, 1.0, 1.0], [3.0, 1.0, 1.0]])}, 2)
        [[2.0, 1.0, 1.0], [3.0, 1.0, 1.0]]
        >>> batch_spacings({}, 2)
        [None, None]
    """
    spacing = batch.get("spacing") if isinstance(batch, Mapping) else None
    if not isinstance(spacing, Tensor):
        return [None] * count
    rows = spacing.reshape(-1, spacing.shape[-1]).double().tolist()  # (B, dims) or (1, dims)
    return rows if len(rows) == count else [rows[0]] * count
