"""Validation, the per-case test protocol, prediction and the results table of a LoMix segmentation model.

:class:`SegmentationEvaluator` scores only the model's prediction (its ``forward``): pooled per-class Dice and IoU
plus the mean HD95 in validation, and per case in test (each image is a case; a whole volume is a case, predicted
slice by slice as in the Synapse/ACDC protocol). :class:`~lomix_lightning.LoMixSegmentationModule` holds one as
``evaluator`` and passes itself as ``model`` (its ``forward``, ``checked_batch``, ``log``); another test protocol (e.g.
sliding-window 3-D inference) replaces :meth:`SegmentationEvaluator.test_case` in a subclass.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor, nn

from lomix_lightning.checks import attached_trainer, scored_classes
from lomix_lightning.errors import LomixUserError
from lomix_lightning.metrics.per_class import EmptyRule, per_class_metrics
from lomix_lightning.metrics.scores import CaseScores, SegmentationScores
from lomix_lightning.metrics.summary import print_metrics_table
from lomix_lightning.metrics.volume import evaluate_volume, predict_volume
from lomix_lightning.resize import resize_logits
from lomix_lightning.sliding_window import SlidingWindow, batch_spacings, sliding_window_logits

__all__ = ["SegmentationEvaluator", "is_volume", "predict_labels"]


def predict_labels(logits: Tensor) -> Tensor:
    """Class indices ``(B, *spatial)`` from logits ``(B, C, *spatial)``: argmax, or sigmoid > 0.5 for one channel.

    Example:
        >>> predict_labels(torch.tensor([[[-1.0, 2.0]]])).tolist()
        [[0, 1]]
    """
    if logits.shape[1] == 1:
        return (logits[:, 0] > 0).long()
    return logits.argmax(dim=1)


def is_volume(batch: Any) -> bool:
    """Whether ``batch`` is a whole test volume (its ``"volume"`` flag is set), to be predicted slice by slice."""
    flag = batch.get("volume", False) if isinstance(batch, Mapping) else False
    return bool(flag.all()) if isinstance(flag, Tensor) else bool(flag)


class SegmentationEvaluator(nn.Module):
    """Scores of a model's prediction: validation (pooled), test (per case), prediction, and their logging.

    Args:
        num_classes: The model's class count (1 = binary with one sigmoid channel).
        class_names: One name per scored class, background first (``scored_classes(num_classes)`` names).
        ignore_index: Label value excluded from every score.
        hd95: Compute HD95 in validation (scipy, on the CPU).
        hd95_empty_rule: Empty-mask rule of HD95/Dice per case.

    Example:
        >>> evaluator = SegmentationEvaluator(3, ["background", "a", "b"])
        >>> mask = torch.zeros(1, 4, 4, dtype=torch.long); mask[0, :2] = 1; mask[0, 2:, :2] = 2
        >>> perfect = lambda x: torch.nn.functional.one_hot(mask, 3).permute(0, 3, 1, 2).float()
        >>> evaluator.test_case(perfect, {"image": torch.zeros(1, 1, 4, 4), "mask": mask})[0]["dice"].tolist()
        [1.0, 1.0]
    """

    def __init__(
        self,
        num_classes: int,
        class_names: Sequence[str],
        ignore_index: int | None = None,
        hd95: bool = True,
        hd95_empty_rule: EmptyRule = "transunet",
        sliding_window: SlidingWindow | None = None,
    ) -> None:
        super().__init__()
        self.num_scored = scored_classes(num_classes)
        self.class_names = list(class_names)
        self.ignore_index = ignore_index
        self.rule = hd95_empty_rule
        self.sliding_window = sliding_window  # checked options: whole images/volumes window by window
        self.val_scores = SegmentationScores(
            self.num_scored, hd95=hd95, rule=hd95_empty_rule, ignore_index=ignore_index
        )
        self.test_cases = CaseScores(self.num_scored - 1)
        self.test_case_results: dict[str, np.ndarray] = {}  # per-case arrays of the last test, (cases, classes)

    # ------------------------------------------------------------------ validation
    def validation_step(self, model: pl.LightningModule, batch: Mapping[str, Tensor]) -> None:
        """Add a batch's prediction to the pooled validation scores."""
        image, mask = model.checked_batch(batch, "validation")
        logits = resize_logits(model(image), mask.shape[2 - image.ndim :])
        self.val_scores.update(predict_labels(logits), mask.long())

    def validation_epoch_end(self, model: pl.LightningModule) -> None:
        """Log ``val/dice`` (and per class), ``val/iou``, ``val/hd95``; reset."""
        self.log_scores(model, "val", self.val_scores.compute())
        self.val_scores.reset()

    # ------------------------------------------------------------------ test: one case at a time
    def test_step(self, model: pl.LightningModule, batch: Mapping[str, Any]) -> None:
        """Score every case of the batch (see :meth:`test_case`)."""
        for case in self.test_case(model, batch):
            self.test_cases.update(case)

    def test_case(self, predict: Any, batch: Mapping[str, Any]) -> list[dict[str, np.ndarray]]:
        """The ``{"dice", "hd95", "iou"}`` arrays of each case in ``batch`` (a volume, or each image).

        ``predict`` maps images ``(b, C_in, H, W)`` to logits; for a volume it is called on batches of slices at
        the volume image size (:meth:`volume_img_size`). A subclass replaces this for another protocol.
        """
        check = getattr(predict, "checked_batch", None)
        if is_volume(batch):
            image, mask = batch["image"], batch["mask"]
            if image.ndim == 4:  # (1, D, H, W) from a batch-size-1 loader
                image, mask = image[0], mask[0]
            if check is not None:
                check({"image": image, "mask": mask}, "test", images=False)
            spacing = batch_spacings(batch, 1)[0]
            img_size = self.volume_img_size(predict)
            return [evaluate_volume(predict, image, mask, self.num_scored, img_size, spacing=spacing, rule=self.rule)]
        image, mask = check(batch, "test") if check is not None else (batch["image"], batch["mask"])
        pred = predict_labels(resize_logits(self.whole_logits(predict, image), mask.shape[2 - image.ndim :]))
        mask = mask.long()
        if self.ignore_index is not None:
            keep = mask != self.ignore_index
            pred, mask = torch.where(keep, pred, 0), torch.where(keep, mask, 0)
        spacings = batch_spacings(batch, len(pred))  # per image, for HD95 (None: voxel units)
        cases = zip(pred.cpu().numpy(), mask.cpu().numpy(), spacings)
        return [per_class_metrics(p, t, self.num_scored, spacing, rule=self.rule) for p, t, spacing in cases]

    def whole_logits(self, predict: Any, image: Tensor) -> Tensor:
        """Prediction logits of whole test images or volumes: window by window when ``sliding_window`` is set."""
        if self.sliding_window is None:
            return predict(image)
        return sliding_window_logits(predict, image, self.sliding_window)

    def test_epoch_end(self, model: pl.LightningModule) -> None:
        """Log the means over cases, keep the per-case arrays in :attr:`test_case_results`, print the table."""
        summary = self.test_cases.compute()
        self.test_case_results = {k[4:]: summary.pop(k).cpu().numpy() for k in list(summary) if k.startswith("all_")}
        model.log("test/cases", summary.pop("cases").float())
        self.log_scores(model, "test", summary)
        if model.trainer.is_global_zero:
            numpy_summary = {k: v.detach().cpu().double().reshape(-1).numpy() for k, v in summary.items()}
            title = "LoMix test results (Dice %, HD95, IoU %)"
            print_metrics_table(numpy_summary, self.class_names[1:], title=title)
        self.test_cases.reset()

    # ------------------------------------------------------------------ prediction
    def predict_step(self, model: pl.LightningModule, batch: Mapping[str, Tensor] | Tensor) -> Tensor:
        """Label maps ``(B, H, W)``, or ``(1, D, H, W)`` for a whole volume (slice by slice, as in testing)."""
        if is_volume(batch):
            return predict_volume(model, batch["image"], img_size=self.volume_img_size(model))[None]
        image = batch["image"] if isinstance(batch, Mapping) else batch
        return predict_labels(self.whole_logits(model, image))

    @staticmethod
    def volume_img_size(model: Any) -> int:
        """The slice size volumes are predicted at: ``model.img_size``, else the datamodule's ``img_size``."""
        size = getattr(model, "img_size", None)
        if size is not None:
            return int(size)
        size = getattr(getattr(attached_trainer(model), "datamodule", None), "img_size", None)
        if not isinstance(size, int):
            raise LomixUserError("volume test sets need img_size: set model.img_size or use a datamodule with img_size")
        return size

    # ------------------------------------------------------------------ logging
    def log_scores(self, model: pl.LightningModule, stage: str, scores: Mapping[str, Tensor]) -> None:
        """Log ``{stage}/dice`` (progress bar), means and per-class values of Dice, IoU (test) and HD95."""
        names = self.class_names[1:]
        metrics: dict[str, Tensor] = {}
        for key in ("dice", "iou", "hd95"):
            values = scores[key].float().reshape(-1)  # torchmetrics squeezes one-class results
            metrics[f"{stage}/{key}"] = torch.nanmean(values) if not torch.isnan(values).all() else values.new_zeros(())
            if key != "iou" or stage == "test":
                for name, value in zip(names, values):
                    metrics[f"{stage}/{key}/{name}"] = value
        if stage == "test":
            metrics["test/miou"] = metrics["test/iou"]
        model.log(f"{stage}/dice", metrics.pop(f"{stage}/dice"), prog_bar=True)
        model.log_dict(metrics, prog_bar=False)
