"""Show per-class metrics (mean over cases, see :class:`~lomix_lightning.metrics.scores.CaseScores`) as a rich table."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

import numpy as np
from rich.console import Console
from rich.table import Table

__all__ = ["metrics_table", "print_metrics_table"]

_METRICS = ("dice", "hd95", "iou")


def metrics_table(
    summary: Mapping[str, np.ndarray], class_names: Sequence[str], title: str = "Per-class metrics"
) -> Table:
    """A rich table with one row per class (Dice %, HD95, IoU %) and a final mean-over-classes row.

    Args:
        summary: Per-class arrays, e.g. from :meth:`~lomix_lightning.metrics.scores.CaseScores.compute` (or one
            case's :func:`per_class_metrics`).
        class_names: One name per scored class (e.g. ``datamodule.class_names[1:]``).
        title: Table title.

    Returns:
        The table.

    Raises:
        ValueError: If the number of names differs from the number of classes.

    Example:
        >>> s = {"dice": np.array([0.9, 0.7]), "hd95": np.array([2.0, 6.0]), "iou": np.array([0.8, 0.6])}
        >>> table = metrics_table(s, ["liver", "pancreas"])
        >>> [c.header for c in table.columns], table.row_count
        (['Class', 'Dice (%)', 'HD95', 'IoU (%)'], 3)
        >>> binary = {"dice": np.array(0.5), "hd95": np.array(1.0), "iou": np.array(1 / 3)}  # one class, 0-d
        >>> [cell for cell in metrics_table(binary, ["polyp"]).columns[1].cells]
        ['50.00', '50.00']
    """
    dice, dist, iou = (np.atleast_1d(np.asarray(summary[k], dtype=np.float64)) for k in _METRICS)  # 0-d: 1 class
    n = len(dice)
    if len(class_names) != n or len(dist) != n or len(iou) != n:
        raise ValueError(f"got {len(class_names)} class names for {n} classes ({len(dist)} HD95, {len(iou)} IoU)")
    table = Table(title=title, min_width=len(title))  # the title on one line
    table.add_column("Class")
    for header in ("Dice (%)", "HD95", "IoU (%)"):
        table.add_column(header, justify="right")
    for i, name in enumerate(class_names):
        table.add_row(name, f"{100 * dice[i]:.2f}", f"{dist[i]:.2f}", f"{100 * iou[i]:.2f}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        means = [np.nanmean(dice) * 100, np.nanmean(dist), np.nanmean(iou) * 100]
    table.add_row("Mean", *(f"{m:.2f}" for m in means), style="bold", end_section=True)
    return table


def print_metrics_table(
    summary: Mapping[str, np.ndarray],
    class_names: Sequence[str],
    title: str = "Per-class metrics",
    console: Console | None = None,
) -> Table:
    """Print :func:`metrics_table` to ``console`` (default: a new stdout console) and return the table.

    Args:
        summary: From :meth:`CaseScores.compute <lomix_lightning.metrics.scores.CaseScores.compute>`.
        class_names: One name per scored class.
        title: Table title.
        console: Where to print.

    Returns:
        The printed table.

    Example:
        >>> s = {"dice": np.array([0.5]), "hd95": np.array([1.0]), "iou": np.array([1 / 3])}
        >>> import io
        >>> console = Console(file=io.StringIO(), width=60)
        >>> _ = print_metrics_table(s, ["tumour"], console=console)
        >>> "tumour" in console.file.getvalue()
        True
    """
    table = metrics_table(summary, class_names, title)
    (console or Console()).print(table)
    return table
