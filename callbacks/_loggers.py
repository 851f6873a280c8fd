"""Send figures, charts and tables to the loggers that can show them: W&B and TensorBoard; others get nothing."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger
from matplotlib.figure import Figure

from lomix_lightning.callbacks._plots import figure_to_rgb

WandbPayload = Callable[[Any], dict[str, Any]]
"""Builds extra W&B objects (charts, tables) from the imported ``wandb`` module."""


def run_dir(trainer: pl.Trainer) -> Path:
    """The directory of this run for files next to the logs: the first logger's run folder, one per run.

    TensorBoard and CSV: their ``log_dir`` (``<save_dir>/<name>/version_<k>``). Any other logger (W&B, MLflow, ...):
    ``<save_dir>/<name>/<version>``, the folder Lightning's ``ModelCheckpoint`` uses for that run (for W&B:
    ``<save_dir>/<project>/<run id>``), so two runs never share it. No logger: ``default_root_dir``.

    Example:
        >>> from lightning.pytorch.loggers import CSVLogger
        >>> trainer = pl.Trainer(logger=CSVLogger("runs", name="demo", version=3), enable_progress_bar=False)
        >>> run_dir(trainer).as_posix()
        'runs/demo/version_3'
    """
    if not trainer.loggers:
        return Path(trainer.default_root_dir)
    logger = trainer.loggers[0]
    if isinstance(logger, (TensorBoardLogger, CSVLogger)):
        return Path(logger.log_dir)
    save_dir = logger.save_dir if logger.save_dir is not None else trainer.default_root_dir
    name, version = logger.name, logger.version
    if name is None or version is None:
        return Path(save_dir)
    return Path(save_dir) / str(name) / (version if isinstance(version, str) else f"version_{version}")


def send_figures(trainer: pl.Trainer, figures: dict[str, Figure], wandb_payload: WandbPayload | None = None) -> None:
    """Send figures to every W&B and TensorBoard logger of the trainer (call on rank zero only).

    W&B gets one ``experiment.log`` call with a ``wandb.Image`` per figure, the ``wandb_payload`` objects and
    ``trainer/global_step`` (never ``step=``: Lightning's ``WandbLogger`` owns wandb's step). TensorBoard gets
    ``add_figure(tag, fig, global_step)``. Other loggers are skipped.

    Args:
        trainer: The trainer.
        figures: ``{tag: figure}``; the caller closes the figures.
        wandb_payload: Optional builder of extra W&B objects.
    """
    step = trainer.global_step
    rgb: dict[str, Any] = {}
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            import wandb

            if not rgb:  # render once, share between W&B loggers
                rgb = {tag: figure_to_rgb(fig) for tag, fig in figures.items()}
            payload: dict[str, Any] = {tag: wandb.Image(image) for tag, image in rgb.items()}
            if wandb_payload is not None:
                payload.update(wandb_payload(wandb))
            payload["trainer/global_step"] = step
            logger.experiment.log(payload)
        elif isinstance(logger, TensorBoardLogger):
            for tag, fig in figures.items():
                logger.experiment.add_figure(tag, fig, global_step=step, close=False)


def line_series_payload(
    key: str, epochs: Sequence[int], series: dict[str, Sequence[float]], title: str
) -> WandbPayload:
    """A ``wandb.plot.line_series`` of several curves over epochs, re-logged with the full history each time.

    Example:
        >>> from types import SimpleNamespace
        >>> build = line_series_payload("lomix/chart/operator_sums", [0, 1], {"Add": [1.0, 0.5]}, "Add weight")
        >>> fake_wandb = SimpleNamespace(plot=SimpleNamespace(line_series=lambda **chart: chart))  # records the call
        >>> build(fake_wandb)["lomix/chart/operator_sums"]
        {'xs': [0, 1], 'ys': [[1.0, 0.5]], 'keys': ['Add'], 'title': 'Add weight', 'xname': 'epoch'}
    """

    def build(wandb: Any) -> dict[str, Any]:
        chart = wandb.plot.line_series(
            xs=list(epochs),
            ys=[list(map(float, values)) for values in series.values()],
            keys=list(series),
            title=title,
            xname="epoch",
        )
        return {key: chart}

    return build


def bar_payload(
    key: str, chart_rows: Sequence[Sequence[Any]], table_rows: Sequence[Sequence[Any]], title: str
) -> WandbPayload:
    """A ``wandb.plot.bar`` over ``wandb.Table(columns=["map", "family", "weight", "share"])``, plus a full table.

    The chart (``chart_rows``, e.g. the top maps) goes to ``key + "/bar_chart"``; the table of ``table_rows`` (every
    map) to ``key + "/table"``.
    """
    columns = ["map", "family", "weight", "share"]

    def build(wandb: Any) -> dict[str, Any]:
        chart = wandb.plot.bar(wandb.Table(columns=columns, data=[list(r) for r in chart_rows]), "map", "weight", title)
        return {
            f"{key}/bar_chart": chart,
            f"{key}/table": wandb.Table(columns=columns, data=[list(r) for r in table_rows]),
        }

    return build
