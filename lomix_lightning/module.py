"""LoMixSegmentationModule: a LightningModule that trains any multi-output segmentation network with LoMix.

The module is the network plus its criterion (:class:`~lomix_lightning.LoMixLoss`) and the training step; the
evaluation protocol is :class:`~lomix_lightning.evaluation.SegmentationEvaluator` (``evaluator``), the non-finite
loss policy :class:`~lomix_lightning.nonfinite.NonFiniteLossGuard` (the base class), the input checks
:mod:`lomix_lightning.checks`.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from typing_extensions import override

from lomix_lightning import checks, inference
from lomix_lightning._config import instantiate_network, network_config
from lomix_lightning.errors import LomixUserError
from lomix_lightning.evaluation import SegmentationEvaluator, predict_labels
from lomix_lightning.inference import InferenceOutput, PredictionNetwork, as_output_list, combine_outputs
from lomix_lightning.losses.lomix import LoMixLoss, LossName, Scheme
from lomix_lightning.losses.precision import full_precision, fusion_dtype
from lomix_lightning.losses.weighting import WeightingName
from lomix_lightning.metrics.per_class import EmptyRule
from lomix_lightning.nonfinite import NonFiniteLossGuard
from lomix_lightning.optimization import build_optimizers
from lomix_lightning.probing import check_probe_strategy, probe_weighting
from lomix_lightning.resize import resize_logits
from lomix_lightning.sliding_window import SlidingWindow, check_sliding_window

Operator = Literal["add", "mul", "cat", "awf"]

# The module checks labels in on_before_batch_transfer (on the host, before they reach the device); Lightning warns
# about that for every datamodule that does not override the hook, which is expected here and says nothing useful.
warnings.filterwarnings(
    "ignore", message="You have overridden `on_before_batch_transfer` in `LightningModule` but have passed in a"
)


class LoMixSegmentationModule(checks.InputChecks, NonFiniteLossGuard):
    """Train a network that returns several logit maps (coarse to fine) with LoMix supervision.

    The loss is a :class:`~lomix_lightning.LoMixLoss` held as :attr:`criterion`; only the prediction (the last map,
    or the sum of all maps) is computed by :meth:`forward`, so inference costs what the bare network costs.
    Validation and test score the prediction only: per-class and mean Dice and IoU (pooled over the split), and
    HD95 (mean over images, or per case for volume test sets, as in the paper's tables).

    Args:
        network: Module returning ``L`` logit maps ``(B, C, h, w)`` ordered coarse to fine (a single tensor works
            with ``supervision="last_layer"``). Maps may be at their native resolution; they are resized
            (bilinear) to the label size.
        num_classes: Number of classes ``C`` (1 for binary segmentation with ``loss="structure"``).
        supervision: ``last_layer``, ``deep_supervision``, ``mutation`` (MERIT/EMCAD) or ``lomix``.
        operators: Override the scheme's fusion operators (e.g. ``["mul"]`` for a single-operator ablation).
        weighting: Override the scheme's weighting: ``learned`` (softplus) or ``fixed`` (1).
        loss: Per-map loss, ``ce_dice`` (multi-class) or ``structure`` (binary).
        ce_weight: Cross-entropy coefficient of ``ce_dice`` (paper: 0.3).
        dice_weight: Dice coefficient of ``ce_dice`` (paper: 0.7).
        inference_output: ``last`` (Synapse/ACDC protocol) or ``sum`` of all maps (polyp/skin/breast protocol).
        class_names: One name per class (index 0 = background); used in metric keys and tables.
        ignore_index: Label value excluded from the loss and the metrics.
        num_outputs: Number of maps the network returns; when not given, ``network.num_outputs``, else a dry run
            on the meta device here (so every parameter exists after ``__init__``), else one on the first training
            batch in ``setup``.
        optimizer: Optimizer factory; ``None`` = AdamW(lr=1e-4, weight_decay=1e-4), the paper's.
        lr_scheduler: Optional scheduler factory.
        loss_weight_lr: Learning rate of the loss-weight parameters (``alpha``); ``None`` = the optimizer's.
        loss_weight_decay: Weight decay of the loss-weight parameters; ``None`` = the optimizer's (the authors'
            code decays them with the network; ``0.0`` exempts them).
        hd95: Compute HD95 in validation and test (scipy, on the CPU).
        hd95_empty_rule: Empty-mask rule of HD95/Dice per case: ``transunet`` (the paper's tables) or ``nan``.
        img_size: Slice size used to predict volume test sets; ``None`` (default) = the datamodule's ``img_size``.
            Only a given value is a hyper-parameter, and it must equal the datamodule's ``img_size`` if it has one.
        nonfinite_loss: ``raise`` an error naming the maps with a NaN/Inf loss, or ``skip`` the batch and count it
            (one device-to-host read per step, one all-reduce under DDP); a skipped batch leaves the model as it was:
            no optimizer step, and every buffer (BatchNorm statistics) restored to its value before the batch's
            forward pass. On an accelerator ``raise`` reads nothing in the step: the first non-finite step is
            remembered on the device and reported at the next logging step (``log_every_n_steps``) or epoch end.
        memory_efficient: Passed to :class:`~lomix_lightning.LoMixLoss`: recompute every mutant and softmax in
            backward, in chunks of images, instead of keeping them (lowest memory, same gradients).
        sliding_window: Test and predict whole images or volumes window by window with MONAI's
            ``sliding_window_inference``: a dict with ``roi_size`` (required), ``overlap`` (0.25), ``mode``
            (``"gaussian"`` or ``"constant"``) and ``sw_batch_size`` (1); ``None``: the whole input at once.

    Example:
        >>> from lomix_lightning.models import UNet
        >>> model = LoMixSegmentationModule(UNet(in_channels=1, num_classes=3, base_channels=4, depth=3), 3)
        >>> model(torch.zeros(2, 1, 32, 32)).shape
        torch.Size([2, 3, 32, 32])
        >>> model.criterion.num_maps
        19
    """

    def __init__(
        self,
        network: nn.Module,
        num_classes: int,
        supervision: Scheme = "lomix",
        operators: list[Operator] | None = None,
        weighting: WeightingName | None = None,
        loss: LossName = "ce_dice",
        ce_weight: float = 0.3,
        dice_weight: float = 0.7,
        inference_output: InferenceOutput = "last",
        class_names: list[str] | None = None,
        ignore_index: int | None = None,
        num_outputs: int | None = None,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        loss_weight_lr: float | None = None,
        loss_weight_decay: float | None = None,
        hd95: bool = True,
        hd95_empty_rule: EmptyRule = "transunet",
        img_size: int | None = None,
        nonfinite_loss: Literal["raise", "skip"] = "raise",
        memory_efficient: bool = False,
        sliding_window: SlidingWindow | None = None,
    ) -> None:
        super().__init__()
        objects = ["network", "optimizer", "lr_scheduler"]  # built objects; plain-data configs are kept
        self.save_hyperparameters(ignore=[*objects, *(["img_size"] if img_size is None else [])])  # None: follows data
        # LightningCLI hands over its parsed config as the hyper-parameters and marks them with "_instantiator" (the
        # key Lightning rebuilds checkpoints by): there the three objects are plain-data configs worth keeping
        if "_instantiator" in self.hparams:
            self.save_hyperparameters(*objects)
        if isinstance(network, Mapping):  # a plain-data config from a checkpoint
            network = instantiate_network(network)
        if "_instantiator" not in self.hparams:  # built in Python: the network's own config (models/ record theirs)
            self.hparams["network"] = network_config(network)
            self.hparams.update(
                {k: v for k, v in (("optimizer", optimizer), ("lr_scheduler", lr_scheduler)) if v is None}
            )
        checks.check_module_args(network, num_classes, inference_output, nonfinite_loss)
        self.network = network
        self.num_classes = num_classes  # the one owner: the CLI links it to the network and the data, never back
        self.img_size = img_size
        self.class_names = checks.class_names_for(num_classes, class_names)
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.criterion: LoMixLoss | None = None
        if num_outputs is None:
            declared = getattr(network, "num_outputs", None)
            num_outputs = declared if isinstance(declared, int) else inference.count_outputs(network)
        if num_outputs is not None:  # else a network the meta device cannot run: counted on a batch in setup
            self._build_criterion(num_outputs)
        self.evaluator = SegmentationEvaluator(
            num_classes, self.class_names, ignore_index, hd95, hd95_empty_rule, check_sliding_window(sliding_window)
        )
        self._init_nonfinite_guard()
        self.engine: str | None = None  # the CE + Dice engine, known when fit starts

    # ------------------------------------------------------------------ the criterion
    def _build_criterion(self, num_outputs: int) -> None:
        hp = self.hparams
        if num_outputs == 1 and hp.supervision != "last_layer":
            raise LomixUserError(
                f"the network returns a single map but supervision={hp.supervision!r} needs several; use "
                "supervision='last_layer' or a multi-output network (e.g. lomix_lightning.models.MultiScaleSMP)"
            )
        try:
            self.criterion = LoMixLoss(
                num_outputs,
                self.num_classes,
                scheme=hp.supervision,
                operators=hp.operators,
                weighting=hp.weighting,
                loss=hp.loss,
                ce_weight=hp.ce_weight,
                dice_weight=hp.dice_weight,
                ignore_index=hp.ignore_index,
                memory_efficient=hp.get("memory_efficient", False),
            )
        except ValueError as error:  # LoMixLoss checks the user's loss options (scheme, operators, weights, ...)
            raise LomixUserError(f"the loss options do not fit this network ({num_outputs} maps): {error}") from error
        self.hparams["num_outputs"] = num_outputs

    @property
    def num_outputs(self) -> int | None:
        """Number of maps the network returns (``None`` until known)."""
        return None if self.criterion is None else self.criterion.num_outputs

    @property
    def test_case_results(self) -> dict[str, np.ndarray]:
        """Per-case ``{"dice", "hd95", "iou"}`` arrays ``(cases, classes)`` of the last test."""
        return self.evaluator.test_case_results

    @override
    def setup(self, stage: str) -> None:
        datamodule = getattr(checks.attached_trainer(self), "datamodule", None)
        if datamodule is not None:
            ours = {"num_classes": self.num_classes, "img_size": self.img_size}
            checks.check_datamodule_agrees(ours, self.hparams_initial, datamodule, self.num_classes)
        if self.criterion is not None:
            return
        batch = self._first_batch()
        was_training = self.network.training
        self.network.eval()
        with torch.no_grad():
            outputs = as_output_list(self.network(batch["image"][:1].to(checks.device_of(self.network))))
        self.network.train(was_training)
        self._build_criterion(len(outputs))
        rank_zero_info(f"LoMix: the network returns {len(outputs)} maps; supervising {self.criterion.num_maps} maps")

    def _first_batch(self) -> dict[str, Tensor]:
        return checks.first_training_batch(checks.attached_trainer(self))

    # ------------------------------------------------------------------ inference
    @override
    def forward(self, x: Tensor) -> Tensor:
        """Prediction logits ``(B, C, H, W)`` at the input resolution: the last map, or the sum of all maps."""
        if self.hparams.inference_output == "last" and callable(getattr(self.network, "forward_final", None)):
            return resize_logits(self.network.forward_final(x), x.shape[2:])
        return combine_outputs(as_output_list(self.network(x)), x.shape[2:], self.hparams.inference_output)

    def predict_labels(self, logits: Tensor) -> Tensor:
        """Class indices ``(B, H, W)`` from prediction logits (sigmoid > 0.5 for one channel)."""
        return predict_labels(logits)

    def export_network(self) -> PredictionNetwork:
        """A plain ``nn.Module`` (deep copy, eval mode) computing exactly :meth:`forward` with no LoMix parameter."""
        mode = self.hparams.inference_output
        exported = PredictionNetwork(copy.deepcopy(inference.prediction_core(self.network, mode)), mode)
        return exported.eval()

    # ------------------------------------------------------------------ training
    def _network_outputs(self, image: Tensor, size: Sequence[int]) -> list[Tensor]:
        outputs = as_output_list(self.network(image))
        if self.criterion is None:
            self._build_criterion(len(outputs))
        if len(outputs) != self.criterion.num_outputs:
            raise LomixUserError(
                f"the network returned {len(outputs)} maps but num_outputs={self.criterion.num_outputs} "
                "(read once from the network); a network must return the same number of maps every step"
            )
        return self._resized_outputs(outputs, size)

    @staticmethod
    def _resized_outputs(outputs: Sequence[Tensor], size: Sequence[int]) -> list[Tensor]:
        """The maps at ``size`` ((H, W) or (D, H, W)), resized in float32 as the loss fuses them (no bf16 resize)."""
        with full_precision(outputs[0].device):
            return [resize_logits(o.to(fusion_dtype(o.dtype)), size) for o in outputs]

    @override
    def training_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor | None:
        image, mask = self._check_batch(batch)
        saved = self._buffers_before_step()  # skip mode only (see nonfinite.py)
        outputs = self._network_outputs(image, mask.shape[2 - image.ndim :])  # (H, W) or (D, H, W)
        # labels checked on the host in on_before_batch_transfer need no check here (that one reads a device value)
        result = self.criterion(outputs, mask, check_target=not self._labels_checked_on_host())
        if self._guard_nonfinite(result, batch_idx, saved):
            return self._skipped_batch_output()
        size = image.shape[0]
        self.log("train/loss", result.total, prog_bar=True, on_epoch=True, batch_size=size, sync_dist=True)
        losses = {"train/loss_original": result.original, "train/loss_mutant": result.mutant}
        self.log_dict(losses, on_step=False, on_epoch=True, batch_size=size, sync_dist=True)
        probe_weighting(self, image, mask)  # `aligned` weights measure gradients here every k steps; others: no-op
        return result.total

    @override
    def on_fit_start(self) -> None:
        """Log which CE + Dice engine trains this model as the ``engine`` hyper-parameter (native or pytorch: why)."""
        if self.criterion is None or self.criterion.loss_name != "ce_dice":
            self.engine = f"pytorch: loss={self.hparams.loss!r}"
        else:  # the criterion's engine
            dtype = torch.promote_types(next(self.network.parameters(), torch.zeros(())).dtype, torch.float32)
            self.engine = self.criterion.engine_for(self.device, dtype)  # the criterion's engine (native or why not)
        for logger in self.loggers:
            logger.log_hyperparams({"engine": self.engine})
        trainer = checks.attached_trainer(self)
        if trainer is not None:
            check_probe_strategy(self.criterion, trainer.strategy)  # `aligned` probes unsharded parameters

    # ------------------------------------------------------------------ evaluation: see evaluation.py
    @override
    def validation_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> None:
        self.evaluator.validation_step(self, batch)

    @override
    def on_validation_epoch_end(self) -> None:
        self.evaluator.validation_epoch_end(self)

    @override
    def test_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> None:
        self.evaluator.test_step(self, batch)

    @override
    def on_test_epoch_end(self) -> None:
        self.evaluator.test_epoch_end(self)

    @override
    def predict_step(self, batch: Mapping[str, Tensor] | Tensor, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        return self.evaluator.predict_step(self, batch)

    # ------------------------------------------------------------------ optimisation
    def loss_weight_parameters(self) -> list[nn.Parameter]:
        """The learned loss-weight parameters (``alpha``), empty for fixed-weight schemes."""
        return [] if self.criterion is None else list(self.criterion.weighting.parameters())

    @override
    def configure_optimizers(self) -> Any:
        hp = self.hparams
        return build_optimizers(
            self.parameters(),
            self.loss_weight_parameters(),
            self.optimizer_factory,
            self.lr_scheduler_factory,
            hp.loss_weight_lr,
            hp.loss_weight_decay,
        )
