"""Test helper (not collected): a callback that dumps each rank's final state, for DDP consistency checks."""

import os
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from lomix_lightning.data import SyntheticShapesDataModule


def _plain(value):
    return value.detach().cpu().clone() if isinstance(value, torch.Tensor) else value


class RankStateDump(Callback):
    """At the end of fit, save ``rank<r>.pt`` with this rank's parameters, weights, metrics and callback states.

    Also records, at every optimizer step, the parameters that have no gradient (DDP needs none of those).
    """

    def __init__(self, dirpath: str | None = None, prefix: str = "") -> None:
        self.dirpath = Path(dirpath or os.environ["LOMIX_TEST_DUMP"])
        self.prefix = prefix
        self.missing_grads: set[str] = set()
        self.steps_checked = 0

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.steps_checked += 1
        self.missing_grads |= {n for n, p in pl_module.named_parameters() if p.requires_grad and p.grad is None}

    def on_fit_end(self, trainer, pl_module):
        lomix = ("BestEpochWeightBarChart", "WeightTrajectoryLogger")
        callbacks = {type(c).__name__: c.state_dict() for c in trainer.callbacks if type(c).__name__ in lomix}
        state = {
            "params": {k: _plain(v) for k, v in pl_module.state_dict().items()},
            "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
            "callbacks": callbacks,
            "skipped": getattr(pl_module, "skipped_batches", None),
            "missing_grads": sorted(self.missing_grads),
            "steps_checked": self.steps_checked,
            "world_size": trainer.world_size,
            "global_step": trainer.global_step,
            "adam_steps": sorted({float(st["step"]) for st in trainer.optimizers[0].state.values() if "step" in st}),
        }
        self.dirpath.mkdir(parents=True, exist_ok=True)
        torch.save(state, self.dirpath / f"{self.prefix}rank{trainer.global_rank}.pt")


def tiny_data() -> SyntheticShapesDataModule:
    """The small demo data every two-process script trains on."""
    return SyntheticShapesDataModule(num_classes=3, image_size=32, num_train=16, num_val=8, batch_size=4)


def two_process_trainer(out: Path, strategy, max_epochs: int, callbacks: list) -> pl.Trainer:
    """A quiet 2-process CPU Trainer: two training batches and one validation batch per epoch, no logger."""
    return pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        max_epochs=max_epochs,
        limit_train_batches=2,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=out / "root",
        callbacks=callbacks,
    )
