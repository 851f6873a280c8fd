"""Shared helpers of the weight callbacks: find the LoMix loss, group its weights by operator family, write them out."""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from lomix_lightning.callbacks._loggers import run_dir
from lomix_lightning.losses.lomix import LoMixLoss
from lomix_lightning.losses.subsets import FAMILIES

OUTPUT_SUBDIR = "lomix_weights"
"""Folder created under the logger's directory (or ``default_root_dir``) when no ``dirpath`` is given."""


def find_criterion(pl_module: nn.Module) -> LoMixLoss:
    """The module's :class:`~lomix_lightning.LoMixLoss`: ``pl_module.criterion``, else the first one among its modules.

    Raises:
        MisconfigurationException: If the module holds no ``LoMixLoss``.

    Example:
        >>> from lomix_lightning import LoMixLoss
        >>> net = nn.ModuleDict({"head": nn.Conv2d(1, 2, 1), "loss_fn": LoMixLoss(num_outputs=2, num_classes=2)})
        >>> find_criterion(net).num_maps
        6
    """
    criterion = getattr(pl_module, "criterion", None)
    if isinstance(criterion, LoMixLoss):
        return criterion
    for module in pl_module.modules():
        if isinstance(module, LoMixLoss):
            return module
    raise MisconfigurationException(
        f"{type(pl_module).__name__} holds no lomix_lightning.LoMixLoss: set `self.criterion = LoMixLoss(...)` in its"
        " __init__ (the weight callbacks read the learned weights from it)"
    )


def setup_criterion(pl_module: nn.Module, callback: str, nothing_to_do: str, warned: set[str]) -> LoMixLoss:
    """:func:`find_criterion`, warning once (remembered in ``warned``) when the loss's weights are fixed.

    ``nothing_to_do`` completes the warning: what the callback ``callback`` has nothing of with fixed weights.
    """
    criterion = find_criterion(pl_module)
    if not criterion.learnable and "fixed" not in warned:
        warned.add("fixed")
        rank_zero_warn(
            f"{callback}: the LoMix loss uses fixed weights (scheme={criterion.scheme!r}); {nothing_to_do}, so this"
            " callback does nothing."
        )
    return criterion


def family_sums(weights: Sequence[float], families: Sequence[str]) -> dict[str, float]:
    """Sum of the weights of each operator family present, in the order ``original, add, mul, cat, awf``.

    Example:
        >>> family_sums([1.0, 2.0, 0.5, 0.25], ["original", "original", "add", "awf"])
        {'original': 3.0, 'add': 0.5, 'awf': 0.25}
    """
    if len(weights) != len(families):
        raise ValueError(f"got {len(weights)} weights but {len(families)} families")
    sums = {family: 0.0 for family in FAMILIES if family in families}
    for weight, family in zip(weights, families):
        sums[family] = sums.get(family, 0.0) + float(weight)
    return sums


def shares(values: dict[str, float]) -> dict[str, float]:
    """Each value's fraction of the total (all 0 when the total is 0).

    Example:
        >>> shares({"original": 3.0, "add": 1.0})
        {'original': 0.75, 'add': 0.25}
    """
    total = sum(values.values())
    return {key: (value / total if total > 0 else 0.0) for key, value in values.items()}


def weight_metrics(names: Sequence[str], families: Sequence[str], weights: Sequence[float], per_map: bool) -> dict:
    """The scalars ``lomix/weight/<map>`` (if ``per_map``), ``lomix/operator/<family>`` and ``lomix/share/<family>``.

    Example:
        >>> metrics = weight_metrics(["P1", "add(1,2)"], ["original", "add"], [1.5, 0.5], per_map=True)
        >>> metrics["lomix/weight/add(1,2)"], metrics["lomix/operator/original"], metrics["lomix/share/add"]
        (0.5, 1.5, 0.25)
    """
    sums = family_sums(weights, families)
    metrics = {f"lomix/weight/{name}": float(w) for name, w in zip(names, weights)} if per_map else {}
    metrics.update({f"lomix/operator/{family}": value for family, value in sums.items()})
    metrics.update({f"lomix/share/{family}": value for family, value in shares(sums).items()})
    return metrics


def log_scalars(trainer: pl.Trainer, metrics: dict[str, float]) -> None:
    """Send scalars to every logger at ``trainer.global_step`` (no ``self.log``, so no collective call)."""
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=trainer.global_step)


def output_dir(trainer: pl.Trainer, dirpath: str | os.PathLike | None) -> Path:
    """Where files go: ``dirpath``, else ``<log dir>/lomix_weights``, created if needed.

    The run's folder is :func:`~lomix_lightning.callbacks._loggers.run_dir` (TensorBoard/CSV ``log_dir``,
    ``<save_dir>/<project>/<run id>`` for W&B, ``default_root_dir`` without a logger), computed without a
    broadcast, so rank zero can call this alone.
    """
    path = Path(dirpath) if dirpath is not None else run_dir(trainer) / OUTPUT_SUBDIR
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Write a CSV file, replacing it atomically so a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    os.replace(tmp, path)
