"""WeightTrajectoryLogger: log, plot and checkpoint how every LoMix loss weight evolves (paper Figs. S.1-S.7)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from typing_extensions import override

from lomix_lightning.callbacks._alignment import alignment_metrics
from lomix_lightning.callbacks._loggers import line_series_payload, send_figures
from lomix_lightning.callbacks._plots import (
    FAMILY_LABELS,
    plot_family_weights,
    plot_operator_sums,
    plot_weight_heatmap,
    save_png,
)
from lomix_lightning.callbacks._weights import (
    family_sums,
    log_scalars,
    output_dir,
    setup_criterion,
    shares,
    weight_metrics,
    write_csv,
)
from lomix_lightning.losses.lomix import LoMixLoss


def _check_positive_int(name: str, value: Any) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{name} must be None or an integer >= 1, got {value!r}")


class WeightTrajectoryLogger(Callback):
    """Record every LoMix loss weight at each epoch end; log scalars, draw figures and write a CSV.

    Scalars go to every logger (``logger.log_metrics`` at ``trainer.global_step``): ``lomix/weight/<map>`` (if
    ``per_map``), ``lomix/operator/<family>`` (summed weight of an operator family) and ``lomix/share/<family>``
    (its fraction of the total). All learned weights shrink during training, so the shares are what to read.
    With ``weighting="aligned"``, after every probe also ``lomix/alignment/<map>`` (if ``per_map``) and
    ``lomix/alignment_family/<family>``: the measured alignment with the main map that drives the weights.
    Figures (operator sums, an all-map heatmap, one figure per family) are saved as PNGs with the history as
    ``weights.csv`` and sent to W&B (``lomix/figure/*`` images, ``lomix/chart/*`` line series) and TensorBoard
    (``lomix/figure/*``). Only rank zero writes; no collective call is made. Fixed-weight schemes are skipped
    with one warning.

    Args:
        every_n_steps: Also log the scalars every ``n`` optimizer steps (``None``: only at epoch ends).
        per_map: Log one scalar per map (48 with four outputs) besides the family sums and shares.
        plot_every_n_epochs: Draw and send figures every ``n`` epochs (``None``: only when training ends, which
            always draws them).
        dirpath: Folder for PNGs and the CSV; default ``<logger dir>/lomix_weights`` (TensorBoard/CSV
            ``log_dir``, another logger's ``save_dir``, or ``default_root_dir`` without a logger).

    Attributes:
        history: ``{epoch: {"step": int, "weights": {map: weight}}}``, saved in checkpoints.

    Raises:
        ValueError: If ``every_n_steps`` or ``plot_every_n_epochs`` is not ``None`` or a positive integer, or
            ``per_map`` is not a bool.

    Example:
        >>> callback = WeightTrajectoryLogger(every_n_steps=50, plot_every_n_epochs=None)
        >>> trainer = pl.Trainer(callbacks=[callback], logger=False, enable_progress_bar=False)
        >>> callback.history
        {}
    """

    def __init__(
        self,
        every_n_steps: int | None = None,
        per_map: bool = True,
        plot_every_n_epochs: int | None = 10,
        dirpath: str | os.PathLike | None = None,
    ) -> None:
        _check_positive_int("every_n_steps", every_n_steps)
        _check_positive_int("plot_every_n_epochs", plot_every_n_epochs)
        if not isinstance(per_map, bool):
            raise ValueError(f"per_map must be a bool, got {per_map!r}")
        self.every_n_steps = every_n_steps
        self.per_map = per_map
        self.plot_every_n_epochs = plot_every_n_epochs
        self.dirpath = dirpath
        self.history: dict[int, dict[str, Any]] = {}
        self._criterion: LoMixLoss | None = None
        self._warned: set[str] = set()
        self._last_step_logged = -1
        self._last_probe_logged = 0
        self._last_plotted: tuple[int, ...] | None = None

    @property
    def active(self) -> bool:
        """Whether the weights are learned (set at ``setup``); fixed weights are not tracked."""
        return self._criterion is not None and self._criterion.learnable

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != TrainerFn.FITTING:
            return
        self._criterion = setup_criterion(
            pl_module, "WeightTrajectoryLogger", "there is no weight trajectory to log", self._warned
        )
        self._check_names()

    def _loss(self) -> LoMixLoss:
        if self._criterion is None:
            raise RuntimeError("WeightTrajectoryLogger has no LoMix loss yet: it is found in setup(stage='fit')")
        return self._criterion

    def _check_names(self) -> None:
        if self._criterion is None or not self.history:
            return
        recorded = list(next(iter(self.history.values()))["weights"])
        if recorded != self._criterion.map_names:
            raise ValueError(
                f"the weight history holds maps {recorded} but the model's LoMix loss has {self._criterion.map_names};"
                " resume with the same model, or start a new WeightTrajectoryLogger"
            )

    def record(self, epoch: int, step: int) -> None:
        """Store the current weights for ``epoch``, replacing an earlier record of that epoch."""
        self.history[epoch] = {"step": step, "weights": self._loss().weights_dict()}
        self.history = dict(sorted(self.history.items()))

    @property
    def map_names(self) -> list[str]:
        """Names of the recorded maps (the loss's ``map_names``)."""
        return list(self._criterion.map_names) if self._criterion is not None else []

    def as_array(self) -> tuple[list[int], np.ndarray]:
        """The recorded epochs and the ``(E, M)`` weights, in ``map_names`` order."""
        epochs = list(self.history)
        rows = [[record["weights"][name] for name in self.map_names] for record in self.history.values()]
        return epochs, np.asarray(rows, dtype=float).reshape(len(epochs), len(self.map_names))

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._log_alignment(trainer)
        step = trainer.global_step
        if not self.active or self.every_n_steps is None or step % self.every_n_steps or step == self._last_step_logged:
            return
        self._last_step_logged = step  # with gradient accumulation several batches share one step
        if trainer.is_global_zero:
            self._log_scalars(trainer, self._loss().weights_dict())

    def _log_alignment(self, trainer: pl.Trainer) -> None:
        """After each probe of a weighting that measures alignment (``aligned``), log what it measured."""
        weighting = self._criterion.weighting if self._criterion is not None else None
        probes = getattr(weighting, "probe_count", None)  # a host-side count: nothing read from the device here
        if probes is None or probes == self._last_probe_logged:
            return
        self._last_probe_logged = probes
        if trainer.is_global_zero:
            loss = self._loss()
            alignment = weighting.alignment.float().cpu().tolist()
            log_scalars(trainer, alignment_metrics(loss.map_names, loss.map_families, alignment, self.per_map))

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # ModelCheckpoint(save_on_train_epoch_end=False) saves here, before on_train_epoch_end: record now so that
        # checkpoint holds this epoch too (on_train_epoch_end then replaces the record; so does a resumed run).
        if self.active and trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking:
            self.record(trainer.current_epoch, trainer.global_step)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.active:
            return
        epoch = trainer.current_epoch
        self.record(epoch, trainer.global_step)
        if not trainer.is_global_zero:
            return
        self._log_scalars(trainer, self.history[epoch]["weights"])
        self._write_csv(trainer)
        if self.plot_every_n_epochs is not None and (epoch + 1) % self.plot_every_n_epochs == 0:
            self._plot(trainer)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.active and trainer.is_global_zero and self.history:
            self._write_csv(trainer)
            if self._last_plotted != tuple(self.history):  # not drawn yet with this exact history
                self._plot(trainer)

    def _log_scalars(self, trainer: pl.Trainer, weights: dict[str, float]) -> None:
        families = self._loss().map_families
        log_scalars(trainer, weight_metrics(list(weights), families, list(weights.values()), self.per_map))

    def _write_csv(self, trainer: pl.Trainer) -> Path:
        path = output_dir(trainer, self.dirpath) / "weights.csv"
        names = self.map_names
        rows = [[epoch, rec["step"], *(rec["weights"][n] for n in names)] for epoch, rec in self.history.items()]
        write_csv(path, ["epoch", "step", *names], rows)
        return path

    def _plot(self, trainer: pl.Trainer) -> None:
        names, families = self.map_names, self._loss().map_families
        epochs, history = self.as_array()
        figures = {
            "operator_sums": plot_operator_sums(epochs, history, families),
            "weights_heatmap": plot_weight_heatmap(epochs, history, names, families),
        }
        for family in family_sums(history[-1], families):
            figures[f"family_{family}"] = plot_family_weights(epochs, history, names, families, family)
        folder = output_dir(trainer, self.dirpath)
        for name, fig in figures.items():
            save_png(fig, folder / f"{name}.png")
        sums = [family_sums(row, families) for row in history]
        fractions = [shares(row) for row in sums]
        series = {FAMILY_LABELS[f]: [row[f] for row in sums] for f in sums[0]}
        share_series = {FAMILY_LABELS[f]: [row[f] for row in fractions] for f in sums[0]}
        payloads = (
            line_series_payload("lomix/chart/operator_sums", epochs, series, "LoMix weight summed per operator"),
            line_series_payload("lomix/chart/operator_shares", epochs, share_series, "LoMix weight share per operator"),
        )
        send_figures(
            trainer,
            {f"lomix/figure/{name}": fig for name, fig in figures.items()},
            lambda wandb: {k: v for build in payloads for k, v in build(wandb).items()},
        )
        for fig in figures.values():
            fig.clear()
        self._last_plotted = tuple(self.history)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "history": {epoch: {"step": r["step"], "weights": dict(r["weights"])} for epoch, r in self.history.items()}
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = {
            int(epoch): {"step": int(r["step"]), "weights": dict(r["weights"])}
            for epoch, r in state_dict.get("history", {}).items()
        }
        self.history = dict(sorted(self.history.items()))
        self._check_names()
