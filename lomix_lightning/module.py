"""LoMixSegmentationModule: a LightningModule that trains any multi-output segmentation network with LoMix."""

from __future__ import annotations

import copy
import inspect
import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from typing_extensions import override

from lomix_lightning._config import instantiate_network, network_config
from lomix_lightning.errors import LomixUserError, LomixUserTypeError
from lomix_lightning.export import (
    InferenceOutput,
    PredictionNetwork,
    as_output_list,
    combine_outputs,
    prediction_core,
)
from lomix_lightning.loss import LoMixLoss, LoMixLossOutput, LossName, Scheme
from lomix_lightning.metrics.per_class import EmptyRule, per_class_metrics
from lomix_lightning.metrics.scores import CaseScores, SegmentationScores
from lomix_lightning.metrics.summary import print_metrics_table
from lomix_lightning.metrics.volume import evaluate_volume, predict_volume
from lomix_lightning.native import engine as native_engine
from lomix_lightning.precision import full_precision, fusion_dtype
from lomix_lightning.resize import resize_logits
from lomix_lightning.sliding_window import SlidingWindow, batch_spacings, check_sliding_window, sliding_window_logits
from lomix_lightning.weighting import WeightingName

Operator = Literal["add", "mul", "cat", "awf"]

# The module checks labels in on_before_batch_transfer (on the host, before they reach the device); Lightning warns
# about that for every datamodule that does not override the hook, which is expected here and says nothing useful.
warnings.filterwarnings(
    "ignore", message="You have overridden `on_before_batch_transfer` in `LightningModule` but have passed in a"
)


class LoMixSegmentationModule(pl.LightningModule):
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
        num_outputs: Number of maps the network returns; read from ``network.num_outputs`` or a dry run on the
            first training batch when not given.
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
        # built by LightningCLI: hparams are the parsed config (plain data); built in Python: drop the objects here
        from_config = _given_hyperparameters.get() is not None
        ignore = [] if from_config else ["network", "optimizer", "lr_scheduler"]
        if img_size is None:  # follows the data: no hparam that could contradict the datamodule's img_size
            ignore.append("img_size")
        self.save_hyperparameters(ignore=ignore)
        self.img_size = img_size
        if isinstance(network, Mapping):  # a plain-data config from a checkpoint
            network = instantiate_network(network)
        if not isinstance(network, nn.Module):
            raise LomixUserTypeError(
                f"network must be an nn.Module returning a list of logit maps, got {type(network).__name__}"
            )
        self._store_plain_hparams(network, optimizer, lr_scheduler)
        if not isinstance(num_classes, int) or num_classes < 1:
            raise LomixUserError(f"num_classes must be an integer >= 1, got {num_classes!r}")
        if inference_output not in ("last", "sum"):
            raise LomixUserError(f"inference_output must be 'last' or 'sum', got {inference_output!r}")
        if nonfinite_loss not in ("raise", "skip"):
            raise LomixUserError(f"nonfinite_loss must be 'raise' or 'skip', got {nonfinite_loss!r}")
        network_classes = getattr(network, "num_classes", None)
        if isinstance(network_classes, int) and network_classes != num_classes:
            raise LomixUserError(
                f"num_classes={num_classes} but the network predicts {network_classes} classes; "
                "build the network with the same num_classes (the CLI links model.num_classes to it)"
            )
        self.network = network
        self.num_classes = num_classes
        self.sliding_window = check_sliding_window(sliding_window)  # 3-D: whole-volume test/predict by windows
        self.class_names = self._class_names(class_names)
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.criterion: LoMixLoss | None = None
        if num_outputs is None and isinstance(getattr(network, "num_outputs", None), int):
            num_outputs = network.num_outputs
        if num_outputs is not None:
            self._build_criterion(num_outputs)
        scored = max(num_classes, 2)  # binary: background + foreground
        self.val_scores = SegmentationScores(scored, hd95=hd95, rule=hd95_empty_rule, ignore_index=ignore_index)
        self.test_cases = CaseScores(scored - 1)
        self.test_case_results: dict[str, np.ndarray] = {}
        self.skipped_batches = 0
        self._skip_update = False
        self.engine: str | None = None  # the CE + Dice engine, known when fit starts
        self._first_nonfinite: dict[str, Tensor] | None = None  # raise mode on an accelerator, see training_step
        self._host_checked = False  # the current batch's labels were checked before the transfer

    # ------------------------------------------------------------------ construction helpers
    def _store_plain_hparams(self, network: nn.Module, optimizer: Any, lr_scheduler: Any) -> None:
        """Keep hyper-parameters plain data (so checkpoints load with ``weights_only=True``)."""
        given = self.hparams.get("network")
        if not isinstance(given, Mapping):  # built in Python: record the network's own config if it has one
            self.hparams["network"] = network_config(network)
        else:  # built from a config: values the CLI linked into the network are not in it; add them back
            init_args = dict(given.get("init_args") or {})
            accepted = inspect.signature(type(network).__init__).parameters
            for name in ("num_classes", "in_channels"):
                value = getattr(network, name, None)
                if name in accepted and name not in init_args and isinstance(value, int):
                    init_args[name] = value
            self.hparams["network"] = {**given, "init_args": init_args}
        for name, value in (("optimizer", optimizer), ("lr_scheduler", lr_scheduler)):
            if value is None or isinstance(value, Mapping):
                self.hparams[name] = value

    def _class_names(self, class_names: Sequence[str] | None) -> list[str]:
        expected = max(self.num_classes, 2)
        if class_names is None:
            return ["background", "foreground"] if self.num_classes == 1 else [f"class_{i}" for i in range(expected)]
        names = list(class_names)
        if self.num_classes == 1 and len(names) == 1:
            names = ["background", names[0]]
        if len(names) != expected:
            raise LomixUserError(
                f"class_names has {len(names)} entries but num_classes={self.num_classes} needs {expected} "
                "(background first)"
            )
        return names

    def _build_criterion(self, num_outputs: int) -> None:
        hp = self.hparams
        if num_outputs == 1 and hp.supervision != "last_layer":
            raise LomixUserError(
                f"the network returns a single map but supervision={hp.supervision!r} needs several; use "
                "supervision='last_layer' or a multi-output network (e.g. lomix_lightning.models.MultiScaleSMP)"
            )
        try:
            self.criterion = self._make_criterion(num_outputs)
        except ValueError as error:  # LoMixLoss checks the user's loss options (scheme, operators, weights, ...)
            raise LomixUserError(f"the loss options do not fit this network ({num_outputs} maps): {error}") from error
        self.hparams["num_outputs"] = num_outputs

    def _make_criterion(self, num_outputs: int) -> LoMixLoss:
        hp = self.hparams
        return LoMixLoss(
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

    @property
    def num_outputs(self) -> int | None:
        """Number of maps the network returns (``None`` until known)."""
        return None if self.criterion is None else self.criterion.num_outputs

    @override
    def setup(self, stage: str) -> None:
        self._check_datamodule_agrees()
        if self.criterion is not None:
            return
        batch = self._first_batch()
        was_training = self.network.training
        self.network.eval()
        with torch.no_grad():
            outputs = as_output_list(self.network(batch["image"][:1].to(_device_of(self.network))))
        self.network.train(was_training)
        self._build_criterion(len(outputs))
        rank_zero_info(f"LoMix: the network returns {len(outputs)} maps; supervising {self.criterion.num_maps} maps")

    def _check_datamodule_agrees(self) -> None:
        """Refuse a datamodule whose class count, ``img_size`` or any shared hyper-parameter contradicts ours.

        Lightning merges both hyper-parameter sets into the logger; this names the two values in one line first.
        """
        trainer = self._trainer
        datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
        if datamodule is None:
            return
        ours = {"num_classes": self.num_classes, "img_size": self.img_size}
        theirs = {name: getattr(datamodule, name, None) for name in ours}
        data_hparams = getattr(datamodule, "hparams_initial", {})
        for name, value in self.hparams_initial.items():
            if name in data_hparams and name not in ours and not name.startswith("_"):  # _class_path: the CLI's
                ours[name], theirs[name] = value, data_hparams[name]
        if isinstance(theirs["num_classes"], int) and max(theirs["num_classes"], 2) == max(self.num_classes, 2):
            theirs["num_classes"] = self.num_classes  # one sigmoid channel scores the two classes of binary data
        for name, value in ours.items():
            other = theirs[name]
            if value is not None and other is not None and (type(value) is not type(other) or value != other):
                hint = " (leave model.img_size unset: it follows the data)" if name == "img_size" else ""
                raise LomixUserError(
                    f"model.{name}={value!r} contradicts data.{name}={other!r} "
                    f"({type(datamodule).__name__}); give both the same value{hint}"
                )

    def _first_batch(self) -> dict[str, Tensor]:
        trainer = self._trainer
        datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
        loader = None
        if datamodule is not None:
            loader = datamodule.train_dataloader()
        elif trainer is not None and getattr(trainer.fit_loop, "_data_source", None) is not None:
            loader = trainer.fit_loop._data_source.dataloader()
        if loader is None:
            raise LomixUserError("cannot infer the network's number of outputs: pass num_outputs=L to the module")
        batch = next(iter(loader), None)
        if batch is None:
            raise LomixUserError(
                f"the training set is empty: the train dataloader yields no batch ({_describe(loader)})"
            )
        if "image" not in batch:
            raise LomixUserError(f"batches must be dicts with 'image' and 'mask', got keys {sorted(batch)}")
        return batch

    # ------------------------------------------------------------------ inference
    @override
    def forward(self, x: Tensor) -> Tensor:
        """Prediction logits ``(B, C, H, W)`` at the input resolution: the last map, or the sum of all maps."""
        if self.hparams.inference_output == "last" and callable(getattr(self.network, "forward_final", None)):
            return resize_logits(self.network.forward_final(x), x.shape[2:])
        return combine_outputs(as_output_list(self.network(x)), x.shape[2:], self.hparams.inference_output)

    def predict_labels(self, logits: Tensor) -> Tensor:
        """Class indices ``(B, H, W)`` from prediction logits (sigmoid > 0.5 for one channel)."""
        if logits.shape[1] == 1:
            return (logits[:, 0] > 0).long()
        return logits.argmax(dim=1)

    def export_network(self) -> PredictionNetwork:
        """A plain ``nn.Module`` (deep copy, eval mode) computing exactly :meth:`forward` with no LoMix parameter."""
        mode = self.hparams.inference_output
        exported = PredictionNetwork(copy.deepcopy(prediction_core(self.network, mode)), mode)
        return exported.eval()

    # ------------------------------------------------------------------ training
    def _check_batch(self, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        if not isinstance(batch, Mapping) or "image" not in batch or "mask" not in batch:
            got = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
            raise LomixUserError(f"batches must be dicts with 'image' (B, C, H, W) and 'mask' (B, H, W), got {got}")
        image, mask = batch["image"], batch["mask"]
        in_channels = getattr(self.network, "in_channels", None)
        if isinstance(in_channels, int) and image.ndim in (4, 5) and image.shape[1] != in_channels:
            raise LomixUserError(
                f"images have {image.shape[1]} channels but the network expects in_channels={in_channels} "
                f"(image shape {tuple(image.shape)})"
            )
        if self.example_input_array is None:
            self.example_input_array = image[:1].detach()
        return image, mask

    def _network_outputs(self, image: Tensor, size: Sequence[int]) -> list[Tensor]:
        outputs = as_output_list(self.network(image))
        if self.criterion is None:
            self._build_criterion(len(outputs))
        if len(outputs) != self.criterion.num_outputs:
            raise LomixUserError(
                f"the network returned {len(outputs)} maps but num_outputs={self.criterion.num_outputs} "
                "(read once from the network); a network must return the same number of maps every step"
            )
        with full_precision(image.device):  # resized in float32, as the loss fuses them (no bf16 interpolation)
            return [resize_logits(o.to(fusion_dtype(o.dtype)), size) for o in outputs]

    @override
    def training_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor | None:
        image, mask = self._check_batch(batch)
        # skip mode: the forward pass updates buffers (BatchNorm statistics); a skipped batch must not leave a trace
        saved = [b.detach().clone() for b in self.buffers()] if self.hparams.nonfinite_loss == "skip" else None
        outputs = self._network_outputs(image, mask.shape[2 - image.ndim :])  # (H, W) or (D, H, W)
        # labels checked on the host in on_before_batch_transfer need no check here (that one reads a device value)
        result = self.criterion(outputs, mask, check_target=not self._labels_checked_on_host())
        if self.hparams.nonfinite_loss == "skip" or not self._defer_nonfinite_check():
            if self._nonfinite_now(result, batch_idx):  # raise mode raises there; True: skip this batch
                with torch.no_grad():  # every buffer back to its value before this batch's forward pass
                    for buffer, value in zip(self.buffers(), saved):
                        buffer.copy_(value)
                return self._skipped_batch_output()
        else:
            self._nonfinite_record(result, batch_idx)
        batch_size = image.shape[0]
        self.log(
            "train/loss",
            result.total,
            prog_bar=True,
            on_step=True,
            on_epoch=True,
            batch_size=batch_size,
            sync_dist=True,
        )
        self.log(
            "train/loss_original", result.original, on_step=False, on_epoch=True, batch_size=batch_size, sync_dist=True
        )
        self.log(
            "train/loss_mutant", result.mutant, on_step=False, on_epoch=True, batch_size=batch_size, sync_dist=True
        )
        return result.total

    # ------------------------------------------------------------------ non-finite losses
    def _defer_nonfinite_check(self) -> bool:
        """Whether ``raise`` mode checks later (on an accelerator, where reading the flag would drain the queue).

        On the CPU reading a flag costs nothing, so the check runs at once; elsewhere the flag is kept on the
        device and read at the next logging step and at the end of the epoch (see :meth:`_nonfinite_raise_pending`).
        """
        return self.device.type != "cpu"

    def _nonfinite_now(self, result: LoMixLossOutput, batch_idx: int) -> bool:
        """Check now (one host read; under DDP one all-reduce): raise, or return whether to skip the batch."""
        local_flag = (~torch.isfinite(result.total)).to(torch.float32)
        # every rank takes the same branch, so DDP never waits for a missing backward
        if not bool(self._sum_over_ranks(local_flag) > 0):
            return False
        local = bool(local_flag > 0)
        bad = [n for n, v in zip(self.criterion.map_names, result.per_map.tolist()) if not math.isfinite(v)]
        where = f"in maps {bad or ['<weights>']}" if local else "on another rank"
        message = f"non-finite loss at step {self.global_step} (batch {batch_idx}) {where}"
        if self.hparams.nonfinite_loss == "raise":
            raise FloatingPointError(message + "; set nonfinite_loss='skip' to skip such batches")
        self.skipped_batches += 1
        warnings.warn(message + "; batch skipped", stacklevel=3)
        self.log("train/skipped_batches", float(self.skipped_batches), on_step=True, on_epoch=False)
        return True

    def _sum_over_ranks(self, value: Tensor) -> Tensor:
        """``value`` summed over all processes (one all-reduce; none on one device)."""
        trainer = self._trainer
        if trainer is None or trainer.world_size <= 1:
            return value
        return trainer.strategy.reduce(value.clone(), reduce_op="sum")  # the all-reduce works in place

    def _skipped_batch_output(self) -> Tensor | None:
        """What ``training_step`` returns for a skipped batch: nothing on one device, an exact zero under DDP."""
        if self._trainer is None or self.trainer.world_size <= 1:
            return None  # Lightning skips backward and the optimizer step
        # DDP forbids returning None: every rank returns an exact zero that reaches every parameter (so the
        # gradient all-reduce runs as usual) and the optimizer step is dropped in on_before_optimizer_step
        self._skip_update = True
        return sum(p.reshape(-1)[:0].sum() for p in self.parameters() if p.requires_grad)

    def _nonfinite_record(self, result: LoMixLossOutput, batch_idx: int) -> None:
        """``raise`` mode on an accelerator: remember the first non-finite step on the device (no host sync)."""
        bad = ~torch.isfinite(result.total)
        if self._first_nonfinite is None:
            self._first_nonfinite = {
                "flag": torch.zeros((), dtype=torch.bool, device=bad.device),
                "where": torch.zeros(2, dtype=torch.long, device=bad.device),  # (global step, batch index)
                "per_map": torch.zeros_like(result.per_map.detach()),
            }
        state = self._first_nonfinite
        new = bad & ~state["flag"]
        here = torch.tensor([self.global_step, batch_idx], device=bad.device)  # a host-to-device copy, no sync
        state["where"] = torch.where(new, here, state["where"])
        state["per_map"] = torch.where(new, result.per_map.detach(), state["per_map"])
        state["flag"] = state["flag"] | bad

    def _nonfinite_raise_pending(self) -> None:
        """Read the deferred ``raise``-mode flag (one host read, under DDP one all-reduce) and raise if it is set."""
        state = self._first_nonfinite
        if state is None:
            return
        local_flag = state["flag"].to(torch.float32)
        if not bool(self._sum_over_ranks(local_flag) > 0):
            return
        if bool(local_flag > 0):
            step, batch_idx = state["where"].tolist()
            names = self.criterion.map_names
            bad = [n for n, v in zip(names, state["per_map"].tolist()) if not math.isfinite(v)]
            where = f"at step {step} (batch {batch_idx}) in maps {bad or ['<weights>']}"
        else:
            where = "on another rank"
        raise FloatingPointError(
            f"non-finite loss {where} (found at step {self.global_step}: on an accelerator the check is read at "
            "logging steps); set nonfinite_loss='skip' to skip such batches"
        )

    @override
    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        trainer = self._trainer
        every = max(int(getattr(trainer, "log_every_n_steps", 1) or 1), 1) if trainer is not None else 1
        if self._first_nonfinite is not None and (self.global_step % every == 0):
            self._nonfinite_raise_pending()

    @override
    def on_train_epoch_end(self) -> None:
        self._nonfinite_raise_pending()

    @override
    def on_fit_start(self) -> None:
        """Log which CE + Dice engine trains this model as the ``engine`` hyper-parameter (native or pytorch: why)."""
        if self.criterion is None or self.criterion.loss_name != "ce_dice":
            self.engine = f"pytorch: loss={self.hparams.loss!r}"
        else:
            dtype = torch.promote_types(next(self.network.parameters(), torch.zeros(())).dtype, torch.float32)
            maps = self.criterion.num_outputs
            self.engine = native_engine(self.device, dtype, self.num_classes, maps)
        for logger in self.loggers:
            logger.log_hyperparams({"engine": self.engine})

    @override
    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self._skip_update:  # a skipped non-finite batch under DDP: no update on any rank
            optimizer.zero_grad(set_to_none=True)
            self._skip_update = False

    @override
    def on_fit_end(self) -> None:
        trainer = self.trainer
        if trainer.limit_train_batches != 0 and trainer.num_training_batches == 0:
            loader = _describe(trainer.train_dataloader)
            raise LomixUserError(f"the training set is empty: the train dataloader yields no batch ({loader})")

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["lomix_skipped_batches"] = self.skipped_batches

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get("hyper_parameters", {}).get("num_classes")
        if isinstance(saved, int) and saved != self.num_classes:
            raise LomixUserError(
                f"the checkpoint was trained with num_classes={saved} but this model has num_classes={self.num_classes}"
                f"; build the model with num_classes={saved}"
            )
        self.skipped_batches = int(checkpoint.get("lomix_skipped_batches", 0))

    # ------------------------------------------------------------------ evaluation
    def _check_labels(self, mask: Tensor, stage: str) -> None:
        high = max(self.num_classes, 2) - 1  # binary masks hold 0 and 1
        bad = (mask < 0) | (mask > high)
        if self.hparams.ignore_index is not None:
            bad &= mask != self.hparams.ignore_index
        if bool(bad.any()):
            values = torch.unique(mask[bad])[:10].tolist()
            raise LomixUserError(
                f"{stage} labels {values} outside [0, {high}] (num_classes={self.num_classes}); "
                "do the data and the model (or checkpoint) have the same number of classes?"
            )

    @override
    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Check the labels while they are still on the host, so no step reads a device value to check them."""
        mask = batch.get("mask") if isinstance(batch, Mapping) else None
        if isinstance(mask, Tensor) and mask.device.type == "cpu" and self._trainer is not None:
            stage = getattr(self.trainer.state.stage, "value", "")
            self._check_labels(mask, {"train": "training", "test": "test"}.get(stage, "validation"))
            self._host_checked = True
        return batch

    def _labels_checked_on_host(self) -> bool:
        """Whether :meth:`on_before_batch_transfer` checked the current batch (a datamodule may override it)."""
        checked, self._host_checked = self._host_checked, False
        return checked

    def _score_batch(self, batch: Mapping[str, Tensor], scores: SegmentationScores) -> None:
        image, mask = self._check_batch(batch)
        if not self._labels_checked_on_host():
            self._check_labels(mask, "validation" if scores is self.val_scores else "test")
        logits = resize_logits(self(image), mask.shape[2 - image.ndim :])
        scores.update(self.predict_labels(logits), mask.long())

    @override
    def validation_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> None:
        self._score_batch(batch, self.val_scores)

    @override
    def on_validation_epoch_end(self) -> None:
        self._log_scores("val", self.val_scores.compute())
        self.val_scores.reset()

    @override
    def test_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> None:
        if self._is_volume(batch):
            self._score_volume(batch)
        else:
            self._score_images(batch)

    @staticmethod
    def _is_volume(batch: Mapping[str, Any]) -> bool:
        flag = batch.get("volume", False) if isinstance(batch, Mapping) else False
        return bool(flag.all()) if isinstance(flag, Tensor) else bool(flag)

    def _volume_img_size(self) -> int:
        if self.img_size is not None:
            return int(self.img_size)
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        size = getattr(datamodule, "img_size", None)
        if not isinstance(size, int):
            raise LomixUserError("volume test sets need img_size: set model.img_size or use a datamodule with img_size")
        return size

    def _score_volume(self, batch: Mapping[str, Any]) -> None:
        image, mask = batch["image"], batch["mask"]
        if image.ndim == 4:  # (1, D, H, W) from a batch-size-1 loader
            image, mask = image[0], mask[0]
        if not self._labels_checked_on_host():
            self._check_labels(mask, "test")
        spacing = batch.get("spacing")
        if isinstance(spacing, Tensor):
            spacing = spacing.reshape(-1).tolist()
        case = evaluate_volume(
            self,
            image,
            mask,
            num_classes=max(self.num_classes, 2),
            img_size=self._volume_img_size(),
            spacing=spacing,
            rule=self.hparams.hd95_empty_rule,
        )
        self.test_cases.update(case)

    def _score_images(self, batch: Mapping[str, Tensor]) -> None:
        """Each test image is a case: per-class Dice, HD95 and IoU, averaged over images at the end."""
        image, mask = self._check_batch(batch)
        pred = self.predict_labels(resize_logits(self._whole_logits(image), mask.shape[2 - image.ndim :]))
        mask = mask.long()
        if self.hparams.ignore_index is not None:
            keep = mask != self.hparams.ignore_index
            pred, mask = torch.where(keep, pred, 0), torch.where(keep, mask, 0)
        spacings = batch_spacings(batch, len(pred))  # per image, for HD95 (None: voxel units)
        for p, t, spacing in zip(pred.cpu().numpy(), mask.cpu().numpy(), spacings):
            scores = per_class_metrics(p, t, max(self.num_classes, 2), spacing, rule=self.hparams.hd95_empty_rule)
            self.test_cases.update(scores)

    def _whole_logits(self, image: Tensor) -> Tensor:
        """Prediction logits of whole test images or volumes: window by window when ``sliding_window`` is set."""
        if self.sliding_window is None:
            return self(image)
        return sliding_window_logits(self, image, self.sliding_window)

    @override
    def on_test_epoch_end(self) -> None:
        summary = self.test_cases.compute()
        self.test_case_results = {k[4:]: summary.pop(k).cpu().numpy() for k in list(summary) if k.startswith("all_")}
        self.log("test/cases", summary.pop("cases").float())
        self._log_scores("test", summary)
        if self.trainer.is_global_zero:
            numpy_summary = {k: v.detach().cpu().double().reshape(-1).numpy() for k, v in summary.items()}
            print_metrics_table(numpy_summary, self.class_names[1:], title="LoMix test results (Dice %, HD95, IoU %)")
        self.test_cases.reset()

    def _log_scores(self, stage: str, scores: Mapping[str, Tensor]) -> None:
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
        headline = metrics.pop(f"{stage}/dice")
        self.log(f"{stage}/dice", headline, prog_bar=True)
        self.log_dict(metrics, prog_bar=False)

    @override
    def predict_step(self, batch: Mapping[str, Tensor] | Tensor, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        if self._is_volume(batch):  # a whole test volume (1, D, H, W): slice by slice, as in testing
            return predict_volume(self, batch["image"], img_size=self._volume_img_size())[None]  # (1, D, H, W)
        image = batch["image"] if isinstance(batch, Mapping) else batch
        return self.predict_labels(self._whole_logits(image))

    # ------------------------------------------------------------------ optimisation
    def loss_weight_parameters(self) -> list[nn.Parameter]:
        """The learned loss-weight parameters (``alpha``), empty for fixed-weight schemes."""
        return [] if self.criterion is None else list(self.criterion.weighting.parameters())

    @override
    def configure_optimizers(self) -> Any:
        weight_ids = {id(p) for p in self.loss_weight_parameters()}
        others = [p for p in self.parameters() if id(p) not in weight_ids and p.requires_grad]
        groups: list[dict[str, Any]] = [{"params": others, "name": "network"}]
        if weight_ids:
            group: dict[str, Any] = {"params": self.loss_weight_parameters(), "name": "loss_weights"}
            if self.hparams.loss_weight_lr is not None:
                group["lr"] = self.hparams.loss_weight_lr
            if self.hparams.loss_weight_decay is not None:
                group["weight_decay"] = self.hparams.loss_weight_decay
            groups.append(group)
        if self.optimizer_factory is None:
            optimizer = torch.optim.AdamW(groups, lr=1e-4, weight_decay=1e-4)
        else:
            optimizer = self.optimizer_factory(groups)
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "monitor": "val/dice"}}


def _describe(loader: Any) -> str:
    """``"dataset of N samples, batch_size B, drop_last D"`` as far as ``loader`` tells."""
    dataset = getattr(loader, "dataset", None)
    parts = [f"dataset of {len(dataset)} samples" if hasattr(dataset, "__len__") else type(loader).__name__]
    for name in ("batch_size", "drop_last"):
        if getattr(loader, name, None) is not None:
            parts.append(f"{name}={getattr(loader, name)}")
    return ", ".join(parts)


def _device_of(module: nn.Module) -> torch.device:
    """The device of ``module``'s first parameter or buffer (the CPU for a module without either)."""
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return torch.device("cpu")
