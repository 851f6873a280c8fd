"""The module's checks of its inputs: arguments, batches, labels, class names and the datamodule's shared settings.

Each raises a one-line :class:`~lomix_lightning.errors.LomixUserError` naming the value and what is allowed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from typing_extensions import override

from lomix_lightning.data.components.validation import labels_outside_range
from lomix_lightning.errors import LomixUserError, LomixUserTypeError

__all__ = [
    "InputChecks",
    "attached_trainer",
    "check_batch",
    "check_module_args",
    "check_datamodule_agrees",
    "check_labels",
    "class_names_for",
    "describe_loader",
    "device_of",
    "first_training_batch",
    "scored_classes",
]


def scored_classes(num_classes: int) -> int:
    """Classes the labels and the scores hold: ``num_classes``, or 2 (background + foreground) for one channel.

    Example:
        >>> scored_classes(1), scored_classes(4)
        (2, 4)
    """
    return max(num_classes, 2)


def check_module_args(network: Any, num_classes: Any, inference_output: Any, nonfinite_loss: Any) -> None:
    """Refuse a module argument of the wrong kind or value, or a network that predicts another class count.

    Example:
        >>> check_module_args(torch.nn.Conv2d(1, 3, 1), 0, "last", "raise")
        Traceback (most recent call last):
        ...
        lomix_lightning.errors.LomixUserError: num_classes must be an integer >= 1, got 0
    """
    if not isinstance(network, nn.Module):
        raise LomixUserTypeError(
            f"network must be an nn.Module returning a list of logit maps, got {type(network).__name__}"
        )
    if not isinstance(num_classes, int) or num_classes < 1:
        raise LomixUserError(f"num_classes must be an integer >= 1, got {num_classes!r}")
    for name, value, allowed in (
        ("inference_output", inference_output, ("last", "sum")),
        ("nonfinite_loss", nonfinite_loss, ("raise", "skip")),
    ):
        if value not in allowed:
            raise LomixUserError(f"{name} must be {allowed[0]!r} or {allowed[1]!r}, got {value!r}")
    network_classes = getattr(network, "num_classes", None)
    if isinstance(network_classes, int) and network_classes != num_classes:
        raise LomixUserError(
            f"num_classes={num_classes} but the network predicts {network_classes} classes; "
            "build the network with the same num_classes (the CLI links model.num_classes to it)"
        )


def check_batch(batch: Any, in_channels: int | None) -> tuple[Tensor, Tensor]:
    """The ``(image, mask)`` of a batch dict, checked against the network's ``in_channels`` when it has one.

    Example:
        >>> image, mask = check_batch({"image": torch.zeros(2, 1, 4, 4), "mask": torch.zeros(2, 4, 4)}, 1)
        >>> check_batch({"image": torch.zeros(2, 3, 4, 4), "mask": torch.zeros(2, 4, 4)}, 1)
        Traceback (most recent call last):
        ...
        lomix_lightning.errors.LomixUserError: images have 3 channels but the network expects in_channels=1 ...
    """
    if not isinstance(batch, Mapping) or "image" not in batch or "mask" not in batch:
        got = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
        raise LomixUserError(f"batches must be dicts with 'image' (B, C, H, W) and 'mask' (B, H, W), got {got}")
    image, mask = batch["image"], batch["mask"]
    if isinstance(in_channels, int) and image.ndim in (4, 5) and image.shape[1] != in_channels:
        raise LomixUserError(
            f"images have {image.shape[1]} channels but the network expects in_channels={in_channels} "
            f"(image shape {tuple(image.shape)})"
        )
    return image, mask


def check_labels(mask: Tensor, num_classes: int, ignore_index: int | None, stage: str) -> None:
    """Refuse label ids outside ``[0, scored_classes(num_classes) - 1]`` (``ignore_index`` excepted).

    Example:
        >>> check_labels(torch.tensor([[0, 1], [2, 5]]), 3, None, "training")
        Traceback (most recent call last):
        ...
        lomix_lightning.errors.LomixUserError: training labels [5] outside [0, 2] (num_classes=3); do the data ...
    """
    high = scored_classes(num_classes) - 1  # binary masks hold 0 and 1
    values = labels_outside_range(mask, high, ignore_index)
    if values:
        raise LomixUserError(
            f"{stage} labels {values} outside [0, {high}] (num_classes={num_classes}); "
            "do the data and the model (or checkpoint) have the same number of classes?"
        )


def class_names_for(num_classes: int, class_names: Sequence[str] | None) -> list[str]:
    """One name per scored class, background first (defaults: ``class_i``; binary: background, foreground).

    Example:
        >>> class_names_for(1, ["polyp"]), class_names_for(3, None)
        (['background', 'polyp'], ['class_0', 'class_1', 'class_2'])
    """
    expected = scored_classes(num_classes)
    if class_names is None:
        return ["background", "foreground"] if num_classes == 1 else [f"class_{i}" for i in range(expected)]
    names = list(class_names)
    if num_classes == 1 and len(names) == 1:
        names = ["background", names[0]]
    if len(names) != expected:
        raise LomixUserError(
            f"class_names has {len(names)} entries but num_classes={num_classes} needs {expected} (background first)"
        )
    return names


def check_datamodule_agrees(
    ours: Mapping[str, Any], hparams: Mapping[str, Any], datamodule: Any, num_classes: int
) -> None:
    """Refuse a datamodule whose class count, ``img_size`` or any shared hyper-parameter contradicts the model's.

    Lightning merges both hyper-parameter sets into the logger; this names the two values in one line first.

    Args:
        ours: The model's ``num_classes`` and ``img_size`` (``None``: follows the data).
        hparams: The model's initial hyper-parameters.
        datamodule: The Trainer's datamodule.
        num_classes: The model's class count (a binary datamodule with 2 classes agrees with 1 sigmoid channel).
    """
    ours = dict(ours)
    theirs = {name: getattr(datamodule, name, None) for name in ours}
    data_hparams = getattr(datamodule, "hparams_initial", {})
    for name, value in hparams.items():
        if name in data_hparams and name not in ours and not name.startswith("_"):  # _class_path: the CLI's
            ours[name], theirs[name] = value, data_hparams[name]
    if isinstance(theirs["num_classes"], int) and scored_classes(theirs["num_classes"]) == scored_classes(num_classes):
        theirs["num_classes"] = num_classes  # one sigmoid channel scores the two classes of binary data
    for name, value in ours.items():
        other = theirs[name]
        if value is not None and other is not None and (type(value) is not type(other) or value != other):
            hint = " (leave model.img_size unset: it follows the data)" if name == "img_size" else ""
            raise LomixUserError(
                f"model.{name}={value!r} contradicts data.{name}={other!r} "
                f"({type(datamodule).__name__}); give both the same value{hint}"
            )


def describe_loader(loader: Any) -> str:
    """``"dataset of N samples, batch_size=B, drop_last=D"`` as far as ``loader`` tells.

    Example:
        >>> describe_loader(torch.utils.data.DataLoader(list(range(3)), batch_size=2))
        'dataset of 3 samples, batch_size=2, drop_last=False'
    """
    dataset = getattr(loader, "dataset", None)
    parts = [f"dataset of {len(dataset)} samples" if hasattr(dataset, "__len__") else type(loader).__name__]
    for name in ("batch_size", "drop_last"):
        if getattr(loader, name, None) is not None:
            parts.append(f"{name}={getattr(loader, name)}")
    return ", ".join(parts)


def device_of(module: nn.Module) -> torch.device:
    """The device of ``module``'s first parameter or buffer (the CPU for a module without either)."""
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return torch.device("cpu")


def first_training_batch(trainer: Any) -> dict[str, Tensor]:
    """The first batch of the training data the Trainer was given (to count a network's maps on it).

    Raises:
        ValueError: If there is no Trainer or training data, the data is empty, or batches are not dicts.
    """
    datamodule = getattr(trainer, "datamodule", None)
    loader = None
    if datamodule is not None:
        loader = datamodule.train_dataloader()
    elif trainer is not None and getattr(trainer.fit_loop, "_data_source", None) is not None:
        # the one private Lightning read: fit(model, train_dataloaders=...) keeps the loader only there until the
        # loop starts (after setup); needed only for a network the meta dry run of count_outputs could not count
        loader = trainer.fit_loop._data_source.dataloader()
    if loader is None:
        raise LomixUserError("cannot infer the network's number of outputs: pass num_outputs=L to the module")
    batch = next(iter(loader), None)
    if batch is None:
        raise LomixUserError(
            f"the training set is empty: the train dataloader yields no batch ({describe_loader(loader)})"
        )
    if "image" not in batch:
        raise LomixUserError(f"batches must be dicts with 'image' and 'mask', got keys {sorted(batch)}")
    return batch


def attached_trainer(module: pl.LightningModule) -> pl.Trainer | None:
    """The module's Trainer, or ``None`` for a module used on its own (``LightningModule.trainer`` raises then)."""
    return module._trainer  # Lightning has no public "is a Trainer attached" query; this reads its own attribute


class InputChecks(pl.LightningModule):
    """Base class of :class:`~lomix_lightning.LoMixSegmentationModule`: its batch and label checks.

    Labels are checked on the host in ``on_before_batch_transfer`` (no device read); a step whose batch was not
    checked there (a datamodule that overrides the hook, a direct call) checks them itself. An empty training set
    and a checkpoint of another class count are refused in one line.
    """

    _host_checked = False  # the current batch's labels were checked before the transfer

    def _check_batch(self, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        image, mask = check_batch(batch, getattr(self.network, "in_channels", None))
        if self.example_input_array is None:
            self.example_input_array = image[:1].detach()
        return image, mask

    def _check_labels(self, mask: Tensor, stage: str) -> None:
        check_labels(mask, self.num_classes, self.hparams.ignore_index, stage)

    def checked_batch(self, batch: Mapping[str, Tensor], stage: str, images: bool = True) -> tuple[Tensor, Tensor]:
        """``(image, mask)`` of an evaluation batch, the labels checked unless that happened on the host."""
        image, mask = self._check_batch(batch) if images else (batch["image"], batch["mask"])
        if not self._labels_checked_on_host():
            self._check_labels(mask, stage)
        return image, mask

    @override
    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Check the labels while they are still on the host, so no step reads a device value to check them."""
        mask = batch.get("mask") if isinstance(batch, Mapping) else None
        trainer = attached_trainer(self)
        if isinstance(mask, Tensor) and mask.device.type == "cpu" and trainer is not None:
            stage = getattr(trainer.state.stage, "value", "")
            self._check_labels(mask, {"train": "training", "test": "test"}.get(stage, "validation"))
            self._host_checked = True
        return batch

    def _labels_checked_on_host(self) -> bool:
        """Whether :meth:`on_before_batch_transfer` checked the current batch (a datamodule may override it)."""
        checked, self._host_checked = self._host_checked, False
        return checked

    @override
    def on_fit_end(self) -> None:
        trainer = self.trainer
        if trainer.limit_train_batches != 0 and trainer.num_training_batches == 0:
            loader = describe_loader(trainer.train_dataloader)
            raise LomixUserError(f"the training set is empty: the train dataloader yields no batch ({loader})")

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get("hyper_parameters", {}).get("num_classes")
        if isinstance(saved, int) and saved != self.num_classes:
            raise LomixUserError(
                f"the checkpoint was trained with num_classes={saved} but this model has num_classes={self.num_classes}"
                f"; build the model with num_classes={saved}"
            )
        super().on_load_checkpoint(checkpoint)
