"""``nonfinite_loss="skip"`` leaves the model exactly as it was before the skipped batch (issue #17, item 4)."""

import copy
import math

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from lomix_lightning import LoMixSegmentationModule
from lomix_lightning.models import UNet


def _batches(poisoned: bool) -> list[dict[str, torch.Tensor]]:
    """Three batches of two 32x32 images; with ``poisoned`` the middle one has a single NaN pixel."""
    gen = torch.Generator().manual_seed(0)
    batches = [
        {"image": torch.randn(2, 1, 32, 32, generator=gen), "mask": torch.randint(0, 3, (2, 32, 32), generator=gen)}
        for _ in range(3)
    ]
    if poisoned:
        batches[1]["image"][1, 0, 17, 5] = float("nan")
        return batches
    return [batches[0], batches[2]]  # the same run without the poisoned batch


def _fit(model: LoMixSegmentationModule, batches, tmp_path) -> pl.Trainer:
    trainer = pl.Trainer(
        max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False, num_sanity_val_steps=0,
        limit_val_batches=0, enable_model_summary=False, default_root_dir=tmp_path, accelerator="cpu", devices=1,
    )  # fmt: skip
    trainer.fit(model, train_dataloaders=DataLoader(batches, batch_size=None))
    return trainer


def test_a_skipped_batch_leaves_every_buffer_and_parameter_as_without_it(tmp_path):
    torch.manual_seed(0)
    skipping = LoMixSegmentationModule(UNet(1, 3, base_channels=4, depth=3), 3, nonfinite_loss="skip", hd95=False)
    clean = copy.deepcopy(skipping)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in skipping.modules())
    with pytest.warns(UserWarning, match=r"non-finite loss at step 1 \(batch 1\) in maps .*; batch skipped"):
        trainer = _fit(skipping, _batches(poisoned=True), tmp_path / "skip")
    _fit(clean, _batches(poisoned=False), tmp_path / "clean")

    assert skipping.skipped_batches == 1
    assert trainer.callback_metrics["train/skipped_batches"] == 1
    optimizer = trainer.optimizers[0]
    steps = {float(optimizer.state[p]["step"]) for group in optimizer.param_groups for p in group["params"]}
    assert steps == {2.0}  # AdamW updated every parameter twice: the skipped batch made no step
    buffers, expected = dict(skipping.named_buffers()), dict(clean.named_buffers())
    assert buffers.keys() == expected.keys() and any("running_var" in name for name in buffers)
    for name, value in buffers.items():
        if name.startswith("network."):  # the statistics; the loss also holds constants (awf's -inf fill)
            assert torch.isfinite(value.float()).all(), name
        torch.testing.assert_close(value, expected[name], rtol=0, atol=0, msg=name)
    for (name, value), (_, reference) in zip(skipping.named_parameters(), clean.named_parameters()):
        torch.testing.assert_close(value, reference, rtol=1e-6, atol=1e-7, msg=name)
    # and the model still predicts: one validation-style forward gives finite logits
    skipping.eval()
    assert torch.isfinite(skipping(torch.randn(1, 1, 32, 32))).all()
    assert math.isfinite(float(skipping.criterion.weights().detach().sum()))
