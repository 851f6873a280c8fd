"""Test helper (not collected): a 2-process FSDP fit on CPU (gloo) with both weight callbacks.

Usage: python tests/_fsdp_script.py OUT_DIR
Lightning 2.6 refuses ``strategy="fsdp"`` with ``accelerator="cpu"`` (the accelerator connector checks
``type(strategy) is FSDPStrategy``) and FSDP needs ``device_id=cpu`` to run there; :class:`CPUFSDPStrategy` is
Lightning's ``FSDPStrategy`` with exactly those two changes, so the launcher, ``use_orig_params=True``, the sharded
parameters and the callbacks' hooks are Lightning's own. Each rank writes OUT_DIR/rank<r>.pt.
"""

import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from _ddp_probe import tiny_data, two_process_trainer
from lightning.pytorch.strategies import FSDPStrategy
from torch.distributed.fsdp import FullyShardedDataParallel

from lomix_lightning import LoMixSegmentationModule
from lomix_lightning.callbacks import BestEpochWeightBarChart, WeightTrajectoryLogger
from lomix_lightning.models import UNet


class CPUFSDPStrategy(FSDPStrategy):
    """Lightning's FSDP strategy, wrapping the model on the CPU (``device_id=cpu``) so that it runs on gloo."""

    def _setup_model(self, model):
        wrapped = FullyShardedDataParallel(
            model, device_id=torch.device("cpu"), sharding_strategy=self.sharding_strategy, **self.kwargs
        )
        return super()._setup_model(wrapped)  # already wrapped: Lightning's own set-up of the rest


class ShardProbe(pl.Callback):
    """Records the shape of ``alpha`` outside forward (the shard) and, at the end, the full weights and the states."""

    def __init__(self, out: Path) -> None:
        self.out, self.shapes, self.before_step = out, [], []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        with FullyShardedDataParallel.summon_full_params(trainer.strategy.model):  # a collective: every rank
            self.before_step.append(pl_module.criterion.weights().detach().clone())

    def on_train_epoch_end(self, trainer, pl_module):
        self.shapes.append(tuple(pl_module.criterion.weighting.alpha.shape))

    def on_fit_end(self, trainer, pl_module):
        with FullyShardedDataParallel.summon_full_params(trainer.strategy.model):  # a collective: every rank
            full = pl_module.criterion.weights().detach().clone()
        states = {type(c).__name__: c.state_dict() for c in trainer.callbacks if "Weight" in type(c).__name__}
        state = {
            "shapes": self.shapes,
            "full": full,
            "before_step": torch.stack(self.before_step),
            "callbacks": states,
            "step": trainer.global_step,
        }
        torch.save(state, self.out / f"rank{trainer.global_rank}.pt")


def main(out: Path) -> None:
    pl.seed_everything(0, verbose=False)
    model = LoMixSegmentationModule(UNet(in_channels=1, num_classes=3, base_channels=4, depth=3), 3, hd95=False)
    callbacks = [
        WeightTrajectoryLogger(dirpath=out / "weights", every_n_steps=1),
        BestEpochWeightBarChart(dirpath=out / "weights", monitor="val/dice"),
        ShardProbe(out),
    ]
    trainer = two_process_trainer(out, CPUFSDPStrategy(process_group_backend="gloo"), 2, callbacks)
    trainer.fit(model, tiny_data())


if __name__ == "__main__":
    warnings.filterwarnings("ignore")
    main(Path(sys.argv[1]))
