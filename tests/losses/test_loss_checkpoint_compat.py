"""A checkpoint written before the loss core moved to ``losses/`` and ``_engine/`` still loads, key for key.

``tests/assets/lomix_before_move.ckpt`` was written by :func:`write_checkpoint` with the code of before the move (commit
``1de300d``, loss in ``lomix_lightning/loss.py``); rerun ``python tests/losses/test_loss_checkpoint_compat.py`` only to
regenerate it on purpose (a state_dict key change is a compatibility break).
"""

from pathlib import Path

import lightning.pytorch as pl
import torch

from lomix_lightning import LoMixSegmentationModule
from lomix_lightning.data import SyntheticShapesDataModule
from lomix_lightning.models import UNet

CHECKPOINT = Path(__file__).parents[1] / "assets" / "lomix_before_move.ckpt"


def _model() -> LoMixSegmentationModule:
    net = UNet(in_channels=1, num_classes=3, base_channels=2, depth=3)
    return LoMixSegmentationModule(net, 3, hd95=False, loss_weight_lr=0.05)


def write_checkpoint(path: Path) -> None:
    """One training step of a tiny LoMix model (all four operators: cat/awf convolutions, learned alpha), saved."""
    torch.manual_seed(0)
    model = _model()
    data = SyntheticShapesDataModule(num_classes=3, image_size=16, num_train=4, num_val=2, num_test=2, batch_size=4)
    trainer = pl.Trainer(
        max_steps=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=path.parent,
    )
    trainer.fit(model, data)
    trainer.save_checkpoint(path, weights_only=True)


def test_checkpoint_of_before_the_move_loads_with_the_same_keys_and_values():
    saved = torch.load(CHECKPOINT, weights_only=True)["state_dict"]
    loaded = LoMixSegmentationModule.load_from_checkpoint(CHECKPOINT, weights_only=True)  # strict: no key missing
    state = loaded.state_dict()
    assert list(state) == list(saved)
    assert list(_model().state_dict()) == list(saved)  # a fresh model writes the same keys today
    for key, value in saved.items():
        assert torch.equal(state[key], value), key
    assert any(k.startswith("criterion.mutation.cat.") for k in saved)
    assert any(k.startswith("criterion.mutation.awf.") for k in saved)
    assert not torch.equal(state["criterion.weighting.alpha"], torch.zeros_like(state["criterion.weighting.alpha"]))


if __name__ == "__main__":
    CHECKPOINT.parent.mkdir(exist_ok=True)
    write_checkpoint(CHECKPOINT)
