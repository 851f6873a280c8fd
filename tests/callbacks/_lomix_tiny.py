"""Tiny LightningModule, DataModule and logger for the callback tests (seconds per fit on a CPU)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import Logger
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lomix_lightning import LoMixLoss
from lomix_lightning.callbacks import BestEpochWeightBarChart, WeightTrajectoryLogger

SIZE = 16


class TinyNet(nn.Module):
    """A conv stem and one 1x1 head per scale; returns ``num_outputs`` maps, coarse (2x2 ...) to fine (16x16)."""

    def __init__(self, num_outputs: int, num_classes: int, channels: int = 4) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, channels, 3, padding=1)
        self.heads = nn.ModuleList(nn.Conv2d(channels, num_classes, 1) for _ in range(num_outputs))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = torch.relu(self.stem(x))
        last = len(self.heads) - 1
        return [
            head(F.avg_pool2d(features, 2 ** (last - i)) if i < last else features) for i, head in enumerate(self.heads)
        ]


class TinyLoMixModule(pl.LightningModule):
    """Holds a LoMixLoss (as ``criterion`` or another attribute) and logs ``val/dice`` from a fixed schedule.

    By default it supervises only two operators (``add``, ``awf``): fewer figures to draw keeps the tests fast.

    It records the loss weights itself at each train-epoch end and each (non-sanity) validation end, so tests can
    compare the callbacks' snapshots with an independent copy.
    """

    def __init__(
        self,
        num_outputs: int = 3,
        num_classes: int = 2,
        scheme: str = "lomix",
        operators: tuple[str, ...] | None = ("add", "awf"),
        val_scores: tuple[float, ...] = (0.5,),
        lr: float = 0.1,
        criterion_attr: str = "criterion",
    ) -> None:
        super().__init__()
        self.net = TinyNet(num_outputs, num_classes)
        setattr(self, criterion_attr, LoMixLoss(num_outputs, num_classes, scheme=scheme, operators=operators))
        self.loss_fn_name = criterion_attr
        self.val_scores = list(val_scores)
        self.lr = lr
        self.train_end_weights: dict[int, dict[str, float]] = {}
        self.val_end_weights: dict[int, dict[str, float]] = {}

    @property
    def loss(self) -> LoMixLoss:
        return getattr(self, self.loss_fn_name)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return self.loss(self.net(x), y).total

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        score = self.val_scores[min(self.current_epoch, len(self.val_scores) - 1)]
        self.log("val/dice", float(score))

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking:
            self.val_end_weights[self.current_epoch] = self.loss.weights_dict()

    def on_train_epoch_end(self) -> None:
        self.train_end_weights[self.current_epoch] = self.loss.weights_dict()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


class PlainModule(TinyLoMixModule):
    """Same network, but a plain cross-entropy loss: there is no LoMixLoss to find."""

    def __init__(self) -> None:
        super().__init__()
        del self.criterion
        self.criterion = nn.CrossEntropyLoss()

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return self.criterion(self.net(x)[-1], y)


class TinyDataModule(pl.LightningDataModule):
    """Random ``(1, 16, 16)`` images with random 2-class masks; batches of 4."""

    def __init__(self, num_samples: int = 12, num_classes: int = 2) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        images = torch.randn(num_samples, 1, SIZE, SIZE, generator=generator)
        masks = torch.randint(0, num_classes, (num_samples, SIZE, SIZE), generator=generator)
        self.dataset = TensorDataset(images, masks)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.dataset, batch_size=4)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.dataset, batch_size=4)


class RecordingLogger(Logger):
    """Keeps every ``log_metrics`` call as ``(step, metrics)``; it cannot take figures."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[int | None, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.calls.append((step, dict(metrics)))

    def lomix_calls(self) -> list[tuple[int | None, dict[str, float]]]:
        return [(step, m) for step, m in self.calls if any(key.startswith("lomix/") for key in m)]


def make_trainer(root: Path, callbacks: list, logger: Any = False, max_epochs: int = 3, **kwargs: Any) -> pl.Trainer:
    options: dict[str, Any] = {
        "default_root_dir": root,
        "accelerator": "cpu",
        "devices": 1,
        "max_epochs": max_epochs,
        "limit_train_batches": 2,
        "limit_val_batches": 1,
        "num_sanity_val_steps": 1,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "log_every_n_steps": 1,
        "callbacks": callbacks,
        "logger": logger,
    }
    options.update(kwargs)
    return pl.Trainer(**options)


def assert_png_not_blank(path: Path) -> None:
    """The file opens as an image with more than one colour and non-zero pixel spread."""
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB"), dtype=float)
    assert pixels.shape[0] > 100 and pixels.shape[1] > 100, pixels.shape
    assert pixels.std() > 0
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 1


def skip_drawing(monkeypatch: Any) -> None:
    """Make figure drawing a no-op, for tests that check only recorded numbers (drawing dominates their run time)."""
    monkeypatch.setattr(WeightTrajectoryLogger, "_plot", lambda self, trainer: None)
    monkeypatch.setattr(BestEpochWeightBarChart, "_chart", lambda self, trainer: None)
