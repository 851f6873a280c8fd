"""Input checks of :class:`~lomix_lightning.LoMixLoss`: the per-map loss option, the target, devices and batch."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from lomix_lightning.data.components.validation import label_range_mask, labels_outside_range
from lomix_lightning.losses.structure import structure_loss

PerMapLoss = Callable[[Tensor, Tensor], Tensor]


def per_map_loss(
    loss: str | PerMapLoss, num_classes: int, ce_weight: float, dice_weight: float, ignore_index: int | None
) -> tuple[str, PerMapLoss | None]:
    """``(name, callable)`` of the per-map loss; ``None`` for ``ce_dice`` (the fused engine computes it).

    Raises:
        ValueError: On an unknown loss or one that does not fit ``num_classes``, negative coefficients, or
            ``ignore_index`` with ``structure``.

    Example:
        >>> per_map_loss("ce_dice", 3, 0.3, 0.7, None)
        ('ce_dice', None)
    """
    if callable(loss):
        return getattr(loss, "__name__", type(loss).__name__), loss
    if loss == "ce_dice":
        if num_classes < 2:
            raise ValueError(
                f"loss='ce_dice' needs num_classes >= 2 (softmax over classes), got num_classes={num_classes};"
                " use loss='structure' for binary segmentation with one output channel"
            )
        if ce_weight < 0 or dice_weight < 0:
            raise ValueError(f"ce_weight and dice_weight must be >= 0, got {ce_weight} and {dice_weight}")
        return loss, None
    if loss == "structure":
        if num_classes != 1:
            raise ValueError(f"loss='structure' is binary and needs num_classes=1, got num_classes={num_classes}")
        if ignore_index is not None:
            raise ValueError(f"loss='structure' does not support ignore_index (got {ignore_index})")
        return loss, structure_loss
    raise ValueError(
        f"unknown loss {loss!r}; allowed are 'ce_dice', 'structure' or a callable (logits, target) -> scalar"
    )


def checked_target(
    target: Tensor, size: tuple[int, ...], batch: int, num_classes: int, ignore_index: int | None, check: bool
) -> Tensor:
    """The target as ``(B, *size)`` after checking its shape, dtype and (with ``check``) its label range.

    Raises:
        TypeError: If a multi-class target is not integer.
        ValueError: On a wrong shape or (with ``check``) labels outside ``[0, C)`` (binary: ``[0, 1]``).

    Example:
        >>> checked_target(torch.tensor([[[0, 5]]]), (1, 2), 1, 3, None, True)
        Traceback (most recent call last):
        ...
        ValueError: target holds labels [5] outside [0, 3)
    """
    binary = num_classes == 1
    if binary and target.ndim == len(size) + 2 and target.shape[1] == 1:
        target = target[:, 0]
    expected = (batch, *size)
    if tuple(target.shape) != expected:
        dims = "D, H, W" if len(size) == 3 else "H, W"
        extra = f" or (B, 1, {dims})" if binary else ""
        raise ValueError(
            f"target has shape {tuple(target.shape)}, expected (B, {dims}){extra} = {expected} "
            "to match the batch size and the largest output resolution"
        )
    if not binary and (target.is_floating_point() or target.is_complex() or target.dtype == torch.bool):
        raise TypeError(f"target must hold integer class indices for num_classes={num_classes}, got {target.dtype}")
    if check:
        high = 1 if binary else num_classes - 1
        allowed = "[0, 1]" if binary else f"[0, {num_classes})"
        ignore = f" or ignore_index={ignore_index}" if ignore_index is not None else ""
        if torch.compiler.is_compiling():  # no host read inside a compiled graph: a device-side assertion
            bad = label_range_mask(target, high, ignore_index)
            torch._assert_async(~bad.any(), f"target holds labels outside {allowed}{ignore}")
        else:
            values = labels_outside_range(target, high, ignore_index)
            if values:
                raise ValueError(f"target holds labels {values} outside {allowed}{ignore}")
    return target


def check_devices_and_batch(outputs: Sequence[Tensor], target: Tensor) -> None:
    """One device for every output and the target, and a non-empty batch (both engines refuse B = 0 alike)."""
    if not isinstance(target, Tensor):
        raise TypeError(f"target must be a Tensor of class indices, got {type(target).__name__}")
    devices = [str(out.device) for out in outputs]
    if len(set(devices)) > 1:
        where = ", ".join(f"P{i + 1} on {device}" for i, device in enumerate(devices))
        raise ValueError(f"the outputs are on different devices ({where}); move them to one device")
    if target.device != outputs[0].device:
        raise ValueError(
            f"the outputs are on {outputs[0].device} but the target is on {target.device}; "
            "move the target to the outputs' device (e.g. target.to(outputs[0].device))"
        )
    if outputs[0].shape[0] == 0:
        raise ValueError(
            f"the batch is empty: the outputs have batch size 0 (P1 shape {tuple(outputs[0].shape)}); "
            "a loss over no image is undefined; skip empty batches before the loss"
        )
