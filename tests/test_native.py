"""The compiled CPU kernels (lomix_lightning/native) against the PyTorch implementation they replace."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader

import lomix_lightning._engine as engine
import lomix_lightning._engine.native as native
from lomix_lightning import LoMixLoss, LoMixSegmentationModule
from lomix_lightning.losses.ce_dice import ce_dice_backward, ce_dice_forward, ce_dice_target
from lomix_lightning.models import UNet

needs_native = pytest.mark.skipif(native.library() is None, reason="no C compiler: the kernels are not built")


def _run(loss, maps, target, use_native, monkeypatch):
    monkeypatch.setenv("LOMIX_NATIVE", "1" if use_native else "0")
    maps = [m.detach().clone().requires_grad_() for m in maps]
    loss.zero_grad()
    out = loss(maps, target)
    out.total.backward()
    params = [p.grad.clone() for p in loss.parameters() if p.grad is not None]
    return out.per_map.detach(), [m.grad for m in maps], params


CASES = [  # (num_outputs, classes, scheme, operators, ignore_index, memory_efficient, size)
    (4, 5, "lomix", None, None, False, 70),  # 4900 pixels: 5 tiles of 1024, the last partial
    (4, 5, "lomix", None, 2, False, 70),
    (3, 2, "lomix", None, None, True, 33),
    (2, 9, "lomix", ["awf"], None, False, 17),
    (4, 3, "mutation", None, None, False, 20),
    (3, 4, "deep_supervision", None, 0, False, 16),
    (1, 3, "lomix", None, None, False, 16),  # one map: nothing to fuse
    (4, 3, "last_layer", None, None, False, 16),
]


@needs_native
@pytest.mark.parametrize(("num_outputs", "classes", "scheme", "operators", "ignore", "memory", "size"), CASES)
def test_native_engine_equals_the_tensor_engine(
    monkeypatch, num_outputs, classes, scheme, operators, ignore, memory, size
):
    gen = torch.Generator().manual_seed(num_outputs * 100 + classes)
    loss = LoMixLoss(num_outputs, classes, scheme, operators, ignore_index=ignore, memory_efficient=memory)
    with torch.no_grad():
        for p in loss.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    sizes = [max(1, size >> (num_outputs - 1 - i)) for i in range(num_outputs)]
    maps = [2 * torch.randn(3, classes, s, s, generator=gen) for s in sizes]
    target = torch.randint(0, classes, (3, size, size), generator=gen)
    if ignore is not None:
        target[:, :3] = ignore  # a band of ignored pixels
    fast = _run(loss, maps, target, True, monkeypatch)
    slow = _run(loss, maps, target, False, monkeypatch)
    torch.testing.assert_close(fast[0], slow[0], rtol=1e-5, atol=1e-6)
    for a, b in zip(fast[1] + fast[2], slow[1] + slow[2]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    assert len(fast[2]) == len(slow[2])


@needs_native
def test_kernels_match_the_tensor_functions_with_and_without_ignored_pixels():
    gen = torch.Generator().manual_seed(0)
    logits = 4 * torch.randn(2, 3, 6, 9, 11, generator=gen)
    labels = torch.randint(0, 6, (2, 9, 11), generator=gen)
    labels[0, 0] = 255
    grad = torch.randn(3, 13, generator=gen)
    for ignore in (None, 255):
        prepared = ce_dice_target(labels if ignore else labels.clamp(max=5), 6, torch.float32, ignore)
        p, stats = ce_dice_forward(logits, prepared.target, prepared.valid, prepared.onehot)
        torch.testing.assert_close(engine.native_stats(logits, prepared.target, prepared.valid), stats)
        expected = ce_dice_backward(p, grad, prepared.target, prepared.valid)
        got = engine.native_grad(logits, grad, prepared.target, prepared.valid, torch.empty_like(logits))
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


@needs_native
def test_results_do_not_depend_on_the_thread_count(monkeypatch):
    gen = torch.Generator().manual_seed(1)
    loss = LoMixLoss(4, 4)
    maps = [torch.randn(2, 4, s, s, generator=gen) for s in (9, 18, 36, 72)]
    target = torch.randint(0, 4, (2, 72, 72), generator=gen)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _run(loss, maps, target, True, monkeypatch)
        torch.set_num_threads(max(2, threads))
        many = _run(loss, maps, target, True, monkeypatch)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0], many[0])
    assert all(torch.equal(a, b) for a, b in zip(one[1] + one[2], many[1] + many[2]))


def test_more_classes_than_the_kernels_take_use_the_tensor_path():
    logits = torch.zeros(1, 2, native.MAX_CLASSES + 1, 2, 2)
    assert not native.usable(logits)
    assert engine.native_stats(logits, torch.zeros(1, 2, 2, dtype=torch.long), None) is None
    out = LoMixLoss(2, native.MAX_CLASSES + 1)([logits[:, 0], logits[:, 1]], torch.zeros(1, 2, 2, dtype=torch.long))
    assert torch.isfinite(out.total)
    assert not native.usable(logits[:, :, :3].double())  # float64 (gradcheck) stays on the tensor path


@pytest.mark.parametrize("mode", ["auto", "0"])
def test_the_engine_in_use_is_a_logged_hyperparameter(tmp_path, monkeypatch, mode):
    monkeypatch.setenv("LOMIX_NATIVE", mode)
    model = LoMixSegmentationModule(UNet(1, 3, base_channels=4, depth=3), 3, hd95=False)
    batches = [{"image": torch.randn(2, 1, 32, 32), "mask": torch.randint(0, 3, (2, 32, 32))}]
    trainer = pl.Trainer(
        max_steps=1, logger=CSVLogger(tmp_path), enable_checkpointing=False, enable_progress_bar=False,
        num_sanity_val_steps=0, limit_val_batches=0, enable_model_summary=False, accelerator="cpu", devices=1,
    )  # fmt: skip
    trainer.fit(model, train_dataloaders=DataLoader(batches, batch_size=None))
    expected = "native" if mode == "auto" and native.library() is not None else "pytorch: "
    assert model.engine.startswith(expected)
    if mode == "0":
        assert model.engine == "pytorch: LOMIX_NATIVE=0"
    logged = yaml.safe_load((Path(trainer.logger.log_dir) / "hparams.yaml").read_text())
    assert logged["engine"] == model.engine and logged["num_classes"] == 3  # next to the module's own
