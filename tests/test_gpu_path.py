"""The module's GPU path, checked on the CPU (issue #18): no host synchronisation in a training or validation step,
the dry run on the network's device, the resize to the label size in float32.

On the CPU, reading a tensor costs nothing, so the module checks non-finite losses at once there. On an
accelerator it must not: each read drains the device queue. These tests run the real Lightning loop on the CPU with
the module told to behave as on an accelerator (deferred non-finite check, the PyTorch loss engine, which is what
CUDA runs) and count the operators that read a device value on the host, inside ``training_step`` and
``validation_step`` only (Lightning's own logging is not ours to count).
"""

from collections import Counter

import lightning.pytorch as pl
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lomix_lightning import LoMixSegmentationModule
from lomix_lightning import _engine as engine
from lomix_lightning.data import SyntheticShapesDataModule
from lomix_lightning.models import UNet

SYNC_OPS = {
    "aten._local_scalar_dense",  # .item(), bool(), int(), float()
    "aten.is_nonzero",
    "aten.equal",
    "aten.nonzero",  # boolean-mask indexing, torch.where(cond)
    "aten.masked_select",
    "aten.bincount",  # reads the maximum on CUDA
    "aten._unique2",
    "aten.unique_dim",
    "aten.unique_consecutive",
    "aten.repeat_interleave",
}


class SyncCounter(TorchDispatchMode):
    """Counts host-synchronising operators by name."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        if name in SYNC_OPS:
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))


def _count_in(model: LoMixSegmentationModule, hook: str, counts: list[Counter]) -> None:
    original = getattr(model, hook)

    def counted(*args, **kwargs):
        with SyncCounter() as counter:
            out = original(*args, **kwargs)
        counts.append(counter.counts)
        return out

    setattr(model, hook, counted)


def _fit(monkeypatch, tmp_path, **module_args) -> tuple[list[Counter], list[Counter]]:
    monkeypatch.setattr(engine, "usable", lambda stacked: False)  # the PyTorch engine: what runs on CUDA
    monkeypatch.setattr(LoMixSegmentationModule, "_defer_nonfinite_check", lambda self: True)  # as on CUDA
    data = SyntheticShapesDataModule(num_classes=3, image_size=32, num_train=8, num_val=4, batch_size=4)
    model = LoMixSegmentationModule(UNet(1, 3, base_channels=4, depth=3), 3, hd95=False, **module_args)
    train, val = [], []
    _count_in(model, "training_step", train)
    _count_in(model, "validation_step", val)
    trainer = pl.Trainer(
        max_epochs=1, limit_train_batches=2, limit_val_batches=1, num_sanity_val_steps=0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(model, data)
    assert len(train) == 2 and len(val) == 1
    return train, val


def test_training_and_validation_steps_read_nothing_on_the_host(monkeypatch, tmp_path):
    train, val = _fit(monkeypatch, tmp_path)
    assert [dict(c) for c in train] == [{}, {}]
    assert [dict(c) for c in val] == [{}]


def test_skip_mode_reads_one_flag_per_step(monkeypatch, tmp_path):
    train, _ = _fit(monkeypatch, tmp_path, nonfinite_loss="skip")
    assert [sum(c.values()) for c in train] == [1, 1]


def test_the_counter_sees_the_checks_it_should(monkeypatch, tmp_path):
    """Without a Trainer the loss checks the labels itself (one read): the counter must see it."""
    monkeypatch.setattr(engine, "usable", lambda stacked: False)
    model = LoMixSegmentationModule(UNet(1, 3, base_channels=4, depth=3), 3, hd95=False)
    batch = {"image": torch.randn(2, 1, 16, 16), "mask": torch.zeros(2, 16, 16, dtype=torch.long)}
    with SyncCounter() as counter:
        model.training_step(batch, 0)
    assert counter.counts["aten._local_scalar_dense"] >= 1


def test_deferred_nonfinite_check_names_the_first_bad_step(monkeypatch, tmp_path):
    """On an accelerator ``raise`` mode reads its flag at logging steps; the error names the first bad step."""
    monkeypatch.setattr(LoMixSegmentationModule, "_defer_nonfinite_check", lambda self: True)

    class NaNAtStepTwo(LoMixSegmentationModule):
        def _network_outputs(self, image, size):
            outputs = super()._network_outputs(image, size)
            if self.global_step == 2:
                outputs[0] = outputs[0] + float("nan")
            return outputs

    data = SyntheticShapesDataModule(num_classes=3, image_size=32, num_train=24, num_val=4, batch_size=4)
    model = NaNAtStepTwo(UNet(1, 3, base_channels=4, depth=3), 3, hd95=False)
    trainer = pl.Trainer(
        max_epochs=1, log_every_n_steps=4, num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
    )  # fmt: skip
    with pytest.raises(
        FloatingPointError, match=r"^non-finite loss at step 2 \(batch 2\) in maps \['P1', 'add\(1,2\)'"
    ):
        trainer.fit(model, data)
    assert trainer.global_step == 4  # read at the first logging step after it (log_every_n_steps=4)


class PlainNet(torch.nn.Module):
    """A network without ``num_outputs``: the module finds the count by a dry run in ``setup``."""

    def __init__(self) -> None:
        super().__init__()
        self.net = UNet(1, 3, base_channels=4, depth=3)

    def forward(self, x):
        return self.net(x)


def test_setup_dry_run_runs_on_the_networks_device():
    class FirstBatchOnTheHost(LoMixSegmentationModule):
        def _first_batch(self):
            return {"image": torch.randn(2, 1, 16, 16), "mask": torch.zeros(2, 16, 16, dtype=torch.long)}

    model = FirstBatchOnTheHost(PlainNet(), 3)
    model.network.to("meta")  # stands for a network already moved to the GPU: the host batch must follow it
    model.setup("fit")
    assert model.criterion is not None and model.criterion.num_outputs == 3


def test_maps_are_resized_to_the_labels_in_float32_under_autocast():
    model = LoMixSegmentationModule(UNet(1, 3, base_channels=4, depth=3), 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = model._network_outputs(torch.randn(2, 1, 16, 16), (32, 32))
    assert [tuple(o.shape[-2:]) for o in outputs] == [(32, 32)] * 3
    assert {o.dtype for o in outputs} == {torch.float32}
