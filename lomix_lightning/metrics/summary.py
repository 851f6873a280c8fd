"""Aggregate per-case metrics (mean over cases per class) and show them as a rich table."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

import numpy as np
from rich.console import Console
from rich.table import Table

__all__ = ["aggregate_cases", "metrics_table", "print_metrics_table"]

_METRICS = ("dice", "hd95", "iou")


def aggregate_cases(cases: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Mean over cases, per class, of each metric (``nanmean``: NaN entries from the ``"nan"`` rule are skipped).

    This is the paper protocol: per-organ values are averaged over the test volumes; the overall score is then the
    mean over organs (see :func:`metrics_table`).

    Args:
        cases: One ``{"dice", "hd95", "iou"}`` dict of per-class arrays per case.

    Returns:
        ``{"dice", "hd95", "iou"}`` float64 arrays over classes (NaN where a class is NaN in every case).

    Raises:
        ValueError: If ``cases`` is empty or the arrays disagree in length or keys.

    Example:
        >>> a = {"dice": np.array([1.0, 0.5]), "hd95": np.array([0.0, 2.0]), "iou": np.array([1.0, 1 / 3])}
        >>> b = {"dice": np.array([0.5, np.nan]), "hd95": np.array([4.0, np.nan]), "iou": np.array([1 / 3, np.nan])}
        >>> aggregate_cases([a, b])["dice"].tolist()
        [0.75, 0.5]
    """
    if not cases:
        raise ValueError("`cases` is empty")
    keys = set(cases[0])
    if not set(_METRICS) <= keys or any(set(c) != keys for c in cases):
        raise ValueError(
            f"every case needs the keys {list(_METRICS)} (and the same keys), got {[sorted(c) for c in cases]}"
        )
    out = {}
    for key in sorted(keys):
        stacked = np.stack([np.asarray(c[key], dtype=np.float64) for c in cases])  # (cases, classes)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN column -> NaN, on purpose
            out[key] = np.nanmean(stacked, axis=0)
    return out


def metrics_table(
    summary: Mapping[str, np.ndarray], class_names: Sequence[str], title: str = "Per-class metrics"
) -> Table:
    """A rich table with one row per class (Dice %, HD95, IoU %) and a final mean-over-classes row.

    Args:
        summary: From :func:`aggregate_cases` (or one case's :func:`per_class_metrics`).
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
        summary: From :func:`aggregate_cases`.
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
