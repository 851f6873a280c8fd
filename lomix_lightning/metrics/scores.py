"""torchmetrics states for the module's validation and test scores (DDP-safe sums and concatenations)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric

from lomix_lightning.metrics.per_class import EmptyRule, per_class_metrics


def confusion_counts(
    pred: Tensor, target: Tensor, num_classes: int, valid: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """True positives, false positives and false negatives per class of label maps of any shape.

    Device-side only (``scatter_add``, no ``bincount`` or boolean indexing), so on a GPU nothing waits for the host.
    Every value of ``pred`` and ``target`` must lie in ``[0, num_classes)``; pixels where ``valid`` is false are
    not counted.

    Example:
        >>> tp, fp, fn = confusion_counts(torch.tensor([0, 1, 1, 2]), torch.tensor([0, 1, 2, 2]), 3)
        >>> tp.tolist(), fp.tolist(), fn.tolist()
        ([1, 1, 1], [0, 1, 0], [0, 0, 1])
        >>> tp, fp, fn = confusion_counts(torch.tensor([0, 1, 1, 2]), torch.tensor([0, 1, 2, 2]), 3,
        ...                               valid=torch.tensor([True, True, False, True]))
        >>> tp.tolist(), fp.tolist(), fn.tolist()
        ([1, 1, 1], [0, 0, 0], [0, 0, 0])
    """
    pred, target = pred.reshape(-1).long(), target.reshape(-1).long()
    weight = torch.ones_like(pred) if valid is None else valid.reshape(-1).long()
    zeros = pred.new_zeros(num_classes)
    tp = zeros.scatter_add(0, target, (pred == target).long() * weight)
    pred_count = zeros.scatter_add(0, pred, weight)
    target_count = zeros.scatter_add(0, target, weight)
    return tp, pred_count - tp, target_count - tp


class SegmentationScores(Metric):
    """Dataset-level Dice and IoU per foreground class from summed confusion counts, plus the mean per-image HD95.

    Dice ``2 TP / (2 TP + FP + FN)`` and IoU ``TP / (TP + FP + FN)`` are pooled over all pixels of all images (as
    torchmetrics ``DiceScore(aggregation_level="global")``); a class absent from both prediction and truth scores NaN.
    HD95 is computed per image and class on the CPU under the empty-mask ``rule`` and averaged over images
    (NaN entries skipped).

    Args:
        num_classes: Label values ``0..num_classes-1``; class 0 is the background and is not scored.
        hd95: Compute HD95 (scipy, on the CPU).
        rule: Empty-mask rule for HD95, see :func:`~lomix_lightning.metrics.per_class_metrics`.
        ignore_index: Label value excluded from every score.
    """

    full_state_update = False

    def __init__(
        self, num_classes: int, hd95: bool = True, rule: EmptyRule = "transunet", ignore_index: int | None = None
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2 (background + foreground), got {num_classes}")
        self.num_classes, self.with_hd95, self.rule, self.ignore_index = num_classes, hd95, rule, ignore_index
        for name in ("tp", "fp", "fn"):
            self.add_state(name, torch.zeros(num_classes, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("hd95_sum", torch.zeros(num_classes - 1, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("hd95_count", torch.zeros(num_classes - 1, dtype=torch.float64), dist_reduce_fx="sum")
        self._hd95_host = np.zeros((2, num_classes - 1))  # HD95 sums and counts not yet moved to the device

    def update(self, pred: Tensor, target: Tensor) -> None:
        """Add a batch of label maps ``(B, H, W)``.

        The confusion counts stay on the device; with ``hd95`` the batch is copied to the host once (scipy) and the
        HD95 sums are kept there until :meth:`compute` (or a cross-process sync) moves them to the device.
        """
        keep = None
        if self.ignore_index is not None:
            keep = target != self.ignore_index
            pred, target = torch.where(keep, pred, 0), torch.where(keep, target, 0)
        tp, fp, fn = confusion_counts(pred, target, self.num_classes, keep)
        self.tp += tp
        self.fp += fp
        self.fn += fn
        if self.with_hd95:
            both = torch.stack([pred.long(), target.long()]).cpu().numpy()  # one device-to-host copy per batch
            for p, t in zip(both[0], both[1]):
                values = per_class_metrics(p, t, self.num_classes, rule=self.rule)["hd95"]
                finite = ~np.isnan(values)
                self._hd95_host[0] += np.where(finite, values, 0.0)
                self._hd95_host[1] += finite

    def _flush_host(self) -> None:
        """Move the host-side HD95 sums into the metric states (one host-to-device copy)."""
        if self._hd95_host.any():
            host = torch.as_tensor(self._hd95_host, device=self.hd95_sum.device)
            self.hd95_sum += host[0]
            self.hd95_count += host[1]
            self._hd95_host[:] = 0.0

    def sync(self, *args: Any, **kwargs: Any) -> None:
        """Flush the host-side sums, then gather the states across processes as usual."""
        self._flush_host()
        super().sync(*args, **kwargs)

    def reset(self) -> None:
        """Zero the states and the host-side sums."""
        super().reset()
        self._hd95_host[:] = 0.0

    def compute(self) -> dict[str, Tensor]:
        """``{"dice", "iou", "hd95"}``, each ``(num_classes - 1,)`` over the foreground classes."""
        self._flush_host()
        tp, fp, fn = (x[1:].double() for x in (self.tp, self.fp, self.fn))
        dice = 2 * tp / (2 * tp + fp + fn)  # NaN when a class is absent everywhere
        iou = tp / (tp + fp + fn)
        hd95 = self.hd95_sum / self.hd95_count if self.with_hd95 else torch.full_like(dice, float("nan"))
        return {"dice": dice, "iou": iou, "hd95": hd95}


class CaseScores(Metric):
    """Per-case (e.g. per-volume) metric arrays, gathered across processes; mean over cases per class.

    Args:
        num_scored: Number of scored (foreground) classes per case.
    """

    full_state_update = False

    def __init__(self, num_scored: int) -> None:
        super().__init__()
        self.num_scored = num_scored
        for name in ("dice", "hd95", "iou"):
            self.add_state(name, [], dist_reduce_fx="cat")

    def update(self, case: dict[str, np.ndarray] | dict[str, Tensor]) -> None:
        """Add one case's ``{"dice", "hd95", "iou"}`` arrays."""
        for name in ("dice", "hd95", "iou"):
            value = torch.as_tensor(np.asarray(case[name], dtype=np.float64), device=self.device)
            getattr(self, name).append(value.reshape(1, self.num_scored))

    def compute(self) -> dict[str, Tensor]:
        """Mean over cases per class, the per-case arrays and the number of cases.

        Returns:
            ``"dice"``, ``"hd95"``, ``"iou"``: ``nanmean`` over cases per class; ``"all_dice"``, ``"all_hd95"``,
            ``"all_iou"``: the ``(cases, classes)`` arrays; ``"cases"``: their number.
        """
        out: dict[str, Tensor] = {}
        for name in ("dice", "hd95", "iou"):
            values = getattr(self, name)
            if isinstance(values, Sequence):
                values = torch.cat(values) if values else torch.empty(0, self.num_scored, dtype=torch.float64)
            stacked = values.reshape(-1, self.num_scored)
            out[name] = torch.nanmean(stacked, dim=0)
            out[f"all_{name}"] = stacked
            out["cases"] = torch.tensor(stacked.shape[0])
        return out
