"""BestEpochWeightBarChart: snapshot the LoMix weights at the best validation epoch and chart them (paper Fig. S.8)."""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from lomix_lightning.callbacks._loggers import bar_payload, send_figures
from lomix_lightning.callbacks._plots import plot_weight_bars, save_png
from lomix_lightning.callbacks._weights import output_dir, setup_criterion, write_csv
from lomix_lightning.losses.lomix import LoMixLoss


class BestEpochWeightBarChart(Callback):
    """Track the best value of ``monitor``, keep the LoMix weights of that epoch, and chart them when training ends.

    Like ``ModelCheckpoint``, the callback reads ``trainer.callback_metrics[monitor]`` when validation ends (not
    during the sanity check; NaN is ignored; ties keep the earlier epoch). At each new best it snapshots every map's
    weight with the epoch and step. When training ends (and at every new best if ``log_every_best``) it draws a
    bar chart of the snapshot, sorted by weight and coloured by operator family, and writes:

    * ``best_<monitor>_<mode>.png`` and ``best_<monitor>_<mode>.csv`` (all maps, with rank, family and share);
    * to W&B: ``lomix/best/bar_chart`` (``wandb.plot.bar``), ``lomix/best/table`` (``wandb.Table`` with columns
      map, family, weight, share) and ``lomix/best/figure`` (image); to TensorBoard: ``lomix/best/figure``;
    * a rich table of the ``top_k`` (default 10) largest weights to the terminal.

    Only rank zero writes; no collective call is made. Fixed-weight schemes are skipped with one warning.

    Args:
        monitor: Logged metric that defines the best epoch.
        mode: ``"max"`` if larger is better, ``"min"`` if smaller is better.
        top_k: Bars to draw and terminal rows to print (``None``: every map in the chart, 10 rows).
        log_every_best: Also draw and send the chart at every new best, not only when training ends.
        dirpath: Folder for the PNG and CSV; default ``<logger dir>/lomix_weights`` (as ``WeightTrajectoryLogger``).

    Attributes:
        best_score: Best value of ``monitor`` so far (``None`` before the first validation).
        best_epoch: Epoch of ``best_score``; ``best_step``: its global step.
        best_weights: ``{map: weight}`` at ``best_epoch``.

    Raises:
        ValueError: If ``monitor`` is empty, ``mode`` is not ``"min"``/``"max"``, ``top_k < 1`` or
            ``log_every_best`` is not a bool.

    Example:
        >>> callback = BestEpochWeightBarChart(monitor="val/dice", mode="max", top_k=12)
        >>> callback.state_key
        "BestEpochWeightBarChart{'monitor': 'val/dice', 'mode': 'max'}"
    """

    MODES = ("min", "max")

    def __init__(
        self,
        monitor: str = "val/dice",
        mode: Literal["min", "max"] = "max",
        top_k: int | None = None,
        log_every_best: bool = False,
        dirpath: str | os.PathLike | None = None,
    ) -> None:
        if not isinstance(monitor, str) or not monitor:
            raise ValueError(f"monitor must be a non-empty metric name, got {monitor!r}")
        if mode not in self.MODES:
            raise ValueError(f"mode must be one of {self.MODES}, got {mode!r}")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"top_k must be None or an integer >= 1, got {top_k!r}")
        if not isinstance(log_every_best, bool):
            raise ValueError(f"log_every_best must be a bool, got {log_every_best!r}")
        self.monitor, self.mode, self.top_k = monitor, mode, top_k
        self.log_every_best, self.dirpath = log_every_best, dirpath
        self.best_score: float | None = None
        self.best_epoch: int | None = None
        self.best_step: int | None = None
        self.best_weights: dict[str, float] = {}
        self._criterion: LoMixLoss | None = None
        self._warned: set[str] = set()
        self._charted: tuple[int | None, int | None] | None = None

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(monitor=self.monitor, mode=self.mode)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(message)

    @property
    def active(self) -> bool:
        """Whether the weights are learned (set at ``setup``); fixed weights are not charted."""
        return self._criterion is not None and self._criterion.learnable

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != TrainerFn.FITTING:
            return
        self._criterion = setup_criterion(
            pl_module, "BestEpochWeightBarChart", "there are no learned weights to chart", self._warned
        )

    def improves(self, value: float) -> bool:
        """Whether ``value`` beats the best score (strictly; NaN never does).

        Example:
            >>> callback = BestEpochWeightBarChart(mode="min")
            >>> callback.improves(0.5), callback.improves(float("nan"))
            (True, False)
        """
        if math.isnan(value):
            return False
        if self.best_score is None:
            return True
        return value > self.best_score if self.mode == "max" else value < self.best_score

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.active or trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            available = sorted(trainer.callback_metrics)
            self._warn_once(
                "monitor",
                f"BestEpochWeightBarChart could not find monitor={self.monitor!r} in the logged metrics {available};"
                " log it with self.log(...) in validation",
            )
            return
        value = float(value)
        if not self.improves(value):
            return
        self.best_score, self.best_epoch, self.best_step = value, trainer.current_epoch, trainer.global_step
        self.best_weights = self._loss().weights_dict()
        if self.log_every_best and trainer.is_global_zero:
            self._chart(trainer)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.active and trainer.is_global_zero and self.best_weights:
            if self._charted != (self.best_epoch, self.best_step):  # log_every_best may have drawn this one already
                self._chart(trainer)
            self._print_table()

    def _loss(self) -> LoMixLoss:
        if self._criterion is None:
            raise RuntimeError("BestEpochWeightBarChart has no LoMix loss yet: it is found in setup(stage='fit')")
        return self._criterion

    def ranked(self) -> list[tuple[str, str, float, float]]:
        """``(map, family, weight, share)`` of the best epoch, largest weight first."""
        family = dict(zip(self._loss().map_names, self._loss().map_families))
        total = sum(self.best_weights.values())
        rows = [
            (name, family.get(name, "?"), w, w / total if total > 0 else 0.0) for name, w in self.best_weights.items()
        ]
        return sorted(rows, key=lambda row: -row[2])

    def _stem(self) -> str:
        return f"best_{re.sub(r'[^A-Za-z0-9]+', '_', self.monitor).strip('_')}_{self.mode}"

    def _title(self) -> str:
        return (
            f"LoMix weights at the best epoch {self.best_epoch} ({self.monitor} = {self.best_score:.4g}, {self.mode})"
        )

    def _chart(self, trainer: pl.Trainer) -> Path:
        rows = self.ranked()
        shown = rows[: self.top_k] if self.top_k is not None else rows
        title = self._title() + (f"\ntop {len(shown)} of {len(rows)} maps" if len(shown) < len(rows) else "")
        names, families, weights, shares = zip(*shown)
        fig = plot_weight_bars(names, families, weights, title, shares=shares)
        folder = output_dir(trainer, self.dirpath)
        save_png(fig, folder / f"{self._stem()}.png")
        header = ["rank", "map", "family", "weight", "share", "epoch", "step", "score"]
        extra = [self.best_epoch, self.best_step, self.best_score]
        write_csv(folder / f"{self._stem()}.csv", header, [[i + 1, *row, *extra] for i, row in enumerate(rows)])
        send_figures(trainer, {"lomix/best/figure": fig}, bar_payload("lomix/best", shown, rows, self._title()))
        fig.clear()
        self._charted = (self.best_epoch, self.best_step)
        return folder

    def _print_table(self) -> None:
        from rich.console import Console
        from rich.table import Table

        caption = (
            f"epoch {self.best_epoch}, step {self.best_step}: {self.monitor} = {self.best_score:.4g} ({self.mode})"
        )
        table = Table(title="Best-epoch LoMix weights", caption=caption)
        for column in ("rank", "map", "family", "weight", "share"):
            table.add_column(column, justify="right" if column in ("rank", "weight", "share") else "left")
        for i, (name, family, weight, share) in enumerate(self.ranked()[: self.top_k or 10]):
            table.add_row(str(i + 1), name, family, f"{weight:.4g}", f"{100 * share:.1f}%")
        Console().print(table)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "monitor": self.monitor,
            "mode": self.mode,
            "best_score": self.best_score,
            "best_epoch": self.best_epoch,
            "best_step": self.best_step,
            "best_weights": dict(self.best_weights),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best_score = state_dict.get("best_score")
        self.best_epoch = state_dict.get("best_epoch")
        self.best_step = state_dict.get("best_step")
        self.best_weights = dict(state_dict.get("best_weights", {}))
