"""Reliability (issue #7), single process: exact resume, mixed precision, non-finite losses, one-line CLI errors."""

import csv
import math
import signal
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml
from _subprocess import DATA, FAST
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from lomix_lightning import LoMixLoss, LoMixSegmentationModule
from lomix_lightning.callbacks import InterruptCheckpoint
from lomix_lightning.cli import LoMixCLI, main
from lomix_lightning.cli.errors import summarize_error
from lomix_lightning.data import SyntheticShapesDataModule
from lomix_lightning.losses.mutation import CombinatorialMutation
from lomix_lightning.models import UNet

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------- helpers used by class_path from the CLI
class EpochSeededSampler(Sampler):
    """A shuffle that depends only on (seed, epoch): Lightning calls set_epoch, so a resumed run replays it."""

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())


class ResumableShapes(SyntheticShapesDataModule):
    """The demo data with an epoch-seeded shuffle."""

    def train_dataloader(self) -> DataLoader:
        if self.train_set is None:
            self.setup()
        sampler = EpochSeededSampler(len(self.train_set), self.seed)
        return DataLoader(self.train_set, batch_size=self.batch_size, sampler=sampler)


class _Mapped(Dataset):
    def __init__(self, dataset, fn):
        self.dataset, self.fn = dataset, fn

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        return self.fn(dict(self.dataset[index]))


class LabelsOutOfRange(SyntheticShapesDataModule):
    def _dataset(self, split, n):
        return _Mapped(super()._dataset(split, n), lambda s: {**s, "mask": s["mask"] + 7})


class ThreeChannelImages(SyntheticShapesDataModule):
    """Reports in_channels=1 but serves 3-channel images."""

    def _dataset(self, split, n):
        return _Mapped(super()._dataset(split, n), lambda s: {**s, "image": s["image"].repeat(3, 1, 1)})


class EmptyTrainSet(SyntheticShapesDataModule):
    """An empty training set behind an unshuffled loader (Lightning then runs zero steps silently)."""

    def train_dataloader(self):
        return DataLoader(Subset(self._dataset("train", 1), []), batch_size=self.batch_size)


class EmptyShuffledTrainSet(SyntheticShapesDataModule):
    """An empty training set behind a shuffled loader (torch's RandomSampler refuses it)."""

    def _dataset(self, split, n):
        dataset = super()._dataset(split, n)
        return Subset(dataset, []) if split == "train" else dataset


class DictNet(nn.Module):
    """Returns a dict instead of a list of maps."""

    def __init__(self, in_channels: int = 1, num_classes: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, num_classes, 3, padding=1)

    def forward(self, x):
        return {"out": self.conv(x)}


class FewerMapsNet(DictNet):
    """Declares three maps but returns two."""

    num_outputs = 3

    def forward(self, x):
        return [self.conv(x), self.conv(x)]


# ---------------------------------------------------------------- exact resume
def _fit(tmp_path, name, *args):
    return LoMixCLI(
        args=[
            "fit",
            *FAST,
            "--trainer.limit_train_batches=3",
            "--data.init_args.num_train=12",
            f"--trainer.default_root_dir={tmp_path / name}",
            f"--trainer.logger.init_args.save_dir={tmp_path / name}",
            *args,
        ]
    )


def _callback(cli, name):
    return next(c for c in cli.trainer.callbacks if type(c).__name__ == name)


def _close(a, b, tol=1e-6):
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k], tol) for k in a)
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=0, abs_tol=tol)
    return a == b


def _resume_matches_straight(tmp_path, data_class, epochs=4):
    data = [f"--data.class_path={data_class}"]
    straight = _fit(tmp_path, "straight", *data, f"--trainer.max_epochs={epochs}")
    half = _fit(tmp_path, "half", *data, f"--trainer.max_epochs={epochs // 2}")
    last = Path(half.trainer.log_dir) / "checkpoints" / "last.ckpt"
    resumed = _fit(tmp_path, "resumed", *data, f"--trainer.max_epochs={epochs}", "--ckpt_path", str(last))
    assert resumed.trainer.global_step == straight.trainer.global_step == 3 * epochs
    alpha, alpha_resumed = straight.model.criterion.weighting.alpha, resumed.model.criterion.weighting.alpha
    torch.testing.assert_close(alpha_resumed, alpha, rtol=0, atol=1e-6)
    for name, value in straight.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[name], value, rtol=0, atol=1e-6, msg=name)
    history = _callback(straight, "WeightTrajectoryLogger").history
    assert list(history) == list(range(epochs))
    assert _close(_callback(resumed, "WeightTrajectoryLogger").history, history)
    best, best_resumed = (_callback(c, "BestEpochWeightBarChart").state_dict() for c in (straight, resumed))
    assert _close(best_resumed, best)
    rows = list(csv.DictReader((Path(resumed.trainer.log_dir) / "lomix_weights" / "weights.csv").open()))
    assert [int(r["epoch"]) for r in rows] == list(range(epochs))  # the resumed run's CSV holds the whole history


def test_exact_resume_two_plus_two_epochs_equals_four(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _resume_matches_straight(tmp_path, f"{__name__}.ResumableShapes")


def test_exact_resume_with_the_demo_data(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _resume_matches_straight(tmp_path, "lomix_lightning.data.SyntheticShapesDataModule", epochs=2)


# ---------------------------------------------------------------- mixed precision
def test_fusion_and_losses_run_in_float32_under_autocast():
    torch.manual_seed(0)
    outputs = [torch.randn(2, 3, s, s) for s in (4, 8, 16)]
    target = torch.randint(0, 3, (2, 16, 16))
    loss = LoMixLoss(3, 3)
    half = [o.bfloat16() for o in outputs]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        result = loss(half, target)
        maps = CombinatorialMutation(3, 3)(half)
    assert result.per_map.dtype == result.total.dtype == torch.float32
    assert {m.dtype for m in maps.values()} == {torch.float32}
    reference = loss([o.float() for o in half], target)  # the same bf16 inputs, float32 everywhere, no autocast
    torch.testing.assert_close(result.per_map, reference.per_map, rtol=1e-6, atol=1e-6)


def test_bf16_mixed_trains_the_demo_close_to_float32(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    losses = {}
    for precision in ("32-true", "bf16-mixed"):
        cli = LoMixCLI(args=["fit", *FAST, "--trainer.max_epochs=2", f"--trainer.precision={precision}"])
        losses[precision] = float(cli.trainer.callback_metrics["train/loss_epoch"])
    assert all(math.isfinite(v) for v in losses.values())
    assert losses["bf16-mixed"] == pytest.approx(losses["32-true"], rel=0.03)


# ---------------------------------------------------------------- non-finite losses
def test_skip_is_a_true_skip_and_the_counter_survives_checkpoints(tmp_path):
    model = LoMixSegmentationModule(UNet(1, 3, base_channels=4, depth=3), 3, nonfinite_loss="skip", hd95=False)
    with torch.no_grad():
        model.network.heads[0].bias.fill_(float("nan"))
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    data = SyntheticShapesDataModule(num_classes=3, image_size=32, num_train=8, num_val=4, batch_size=4)
    trainer = pl.Trainer(
        max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False, num_sanity_val_steps=0,
        limit_val_batches=0, enable_model_summary=False, default_root_dir=tmp_path,
    )  # fmt: skip
    with pytest.warns(UserWarning, match="non-finite loss at step 0 \\(batch 0\\) in maps \\['P1'"):
        trainer.fit(model, data)
    assert model.skipped_batches == 2
    for name, value in model.named_parameters():  # no optimizer step happened: not even weight decay
        assert torch.equal(value, before[name]) or name == "network.heads.0.bias", name
    trainer.save_checkpoint(tmp_path / "skip.ckpt")
    loaded = LoMixSegmentationModule.load_from_checkpoint(tmp_path / "skip.ckpt", weights_only=True)
    assert loaded.skipped_batches == 2


# ---------------------------------------------------------------- interruption (the real signals: test_interrupt.py)
def test_first_ctrl_c_requests_a_stop_and_the_second_aborts(tmp_path):
    callback = InterruptCheckpoint()
    trainer = pl.Trainer(callbacks=[callback], logger=False, enable_progress_bar=False, default_root_dir=tmp_path)
    callback._trainer = trainer
    callback._on_sigint(signal.SIGINT, None)
    assert trainer.received_sigterm  # Lightning's own flag: the loops stop after the current batch
    with pytest.raises(KeyboardInterrupt):
        callback._on_sigint(signal.SIGINT, None)


class CtrlCModule(LoMixSegmentationModule):
    def training_step(self, batch, batch_idx):
        raise KeyboardInterrupt


def test_hard_abort_is_one_line_and_exit_130(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    handler = signal.getsignal(signal.SIGINT)
    try:  # Lightning ignores SIGINT after a KeyboardInterrupt; restore it for pytest
        assert main(["fit", *FAST, f"--model.class_path={__name__}.CtrlCModule"]) == 130
    finally:
        signal.signal(signal.SIGINT, handler)
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("lomix: stopped: aborted by Ctrl-C") and "Traceback" not in err


# ---------------------------------------------------------------- bad input: one line from the CLI
def _one_line_error(capsys, argv, code=2):
    assert main(argv) == code
    err = capsys.readouterr().err
    assert "Traceback" not in err and "usage:" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith("lomix: error: "), err
    return line


@pytest.mark.parametrize(
    ("flag", "expected"),
    [
        ("--model.init_args.supervision=lomx", "model.init_args.supervision: invalid value 'lomx'; expected one of "
         "'last_layer', 'deep_supervision', 'mutation', 'lomix'"),
        ("--model.init_args.operators=[add,mull]", "model.init_args.operators: invalid value 'mull'; expected one of "
         "'add', 'mul', 'cat', 'awf'"),
        ("--model.init_args.loss=dice", "model.init_args.loss: invalid value 'dice'; expected one of 'ce_dice', "
         "'structure'"),
        ("--model.init_args.weighting=learnt", "invalid value 'learnt'; expected one of 'learned', 'fixed'"),
        ("--trainer.max_epochs=abc", "trainer.max_epochs: invalid value 'abc'; expected int"),
        ("--model.init_args.network.init_args.depthh=3", "Option 'depthh' is not accepted"),
        ("--model.init_args.network.class_path=nowhere.Net", "class_path 'nowhere.Net': No module named 'nowhere'"),
        ("--trainer.max_epochz=3", "unrecognized arguments: --trainer.max_epochz=3"),
    ],
)  # fmt: skip
def test_bad_flags_give_one_line(capsys, tmp_path, monkeypatch, flag, expected):
    monkeypatch.chdir(tmp_path)
    assert expected in _one_line_error(capsys, ["fit", flag])


def test_bad_yaml_gives_one_line(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump({"model": {"init_args": {"operators": ["add", "concat"]}}}))
    line = _one_line_error(capsys, ["fit", "--config", str(config)])
    assert "model.init_args.operators: invalid value 'concat'" in line and "'awf'" in line
    line = _one_line_error(capsys, ["fit", "--config", str(tmp_path / "missing.yaml")])
    assert "missing.yaml" in line


def test_misconfiguration_gives_one_line_and_help_still_works(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    line = _one_line_error(capsys, ["fit", "--trainer.enable_progress_bar=false"])
    assert "enable_progress_bar=False" in line and "RichProgressBar" in line
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--help"])
    assert exit_info.value.code == 0 and "--trainer.max_epochs" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ([f"--model.init_args.network.class_path={__name__}.DictNet", "--model.init_args.supervision=last_layer",
          "--model.init_args.num_outputs=1"],
         "error: the network must return a Tensor or a list/tuple of Tensors (coarse to fine), got dict"),
        ([f"--model.init_args.network.class_path={__name__}.FewerMapsNet"],
         "the network returned 2 maps but num_outputs=3"),
        ([f"--data.class_path={__name__}.LabelsOutOfRange"], "labels [7, 8, 9, 10] outside [0, 3] (num_classes=4)"),
        ([f"--data.class_path={__name__}.ThreeChannelImages"],
         "images have 3 channels but the network expects in_channels=1"),
        ([f"--data.class_path={__name__}.EmptyTrainSet"],
         "the training set is empty: the train dataloader yields no batch (dataset of 0 samples, batch_size=4"),
        ([f"--data.class_path={__name__}.EmptyShuffledTrainSet"],
         "the training set is empty: the train dataloader yields no batch (dataset of 0 samples"),
    ],
    ids=["output_type", "output_count", "labels", "channels", "empty", "empty_shuffled"],
)  # fmt: skip
def test_bad_data_or_network_gives_one_line(capsys, tmp_path, monkeypatch, args, expected):
    monkeypatch.chdir(tmp_path)
    fast = DATA if "network" in args[0] else FAST  # another network class takes none of the UNet's arguments
    line = _one_line_error(capsys, ["fit", *fast, "--trainer.max_epochs=1", *args])
    assert expected in line, line


class Pickled:
    """Any class: a checkpoint holding one needs unpickling, which weights_only=True refuses."""


def test_unsafe_or_damaged_checkpoints_give_one_line(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"hyper_parameters": {"num_classes": Pickled()}, "state_dict": {}}, tmp_path / "pickled.ckpt")
    line = _one_line_error(capsys, ["test", "--ckpt_path", str(tmp_path / "pickled.ckpt")])
    assert "needs unpickling, which torch.load(weights_only=True) refuses" in line and f"{__name__}.Pickled" in line
    (tmp_path / "damaged.ckpt").write_bytes(b"not a checkpoint")
    assert "it is not a PyTorch checkpoint" in _one_line_error(capsys, ["test", "--ckpt_path", "damaged.ckpt"])


def test_empty_training_set_without_known_output_count(tmp_path):
    model = LoMixSegmentationModule(FewerMapsNet(1, 3).conv, 3, supervision="last_layer")  # a bare conv: no count
    data = EmptyTrainSet(num_classes=3, image_size=32, num_train=4, num_val=4, batch_size=2)
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, default_root_dir=tmp_path)
    with pytest.raises(ValueError, match="the training set is empty: .*dataset of 0 samples, batch_size=2"):
        trainer.fit(model, data)


def test_checkpoint_from_another_num_classes_fails_in_one_line(tmp_path):
    trainer_args = dict(logger=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    three = LoMixSegmentationModule(UNet(1, 3, base_channels=4, depth=3), 3, hd95=False)
    data = SyntheticShapesDataModule(num_classes=3, image_size=32, num_train=4, num_val=4, batch_size=4)
    trainer = pl.Trainer(max_epochs=1, enable_checkpointing=False, **trainer_args)
    trainer.fit(three, data)
    trainer.save_checkpoint(tmp_path / "three.ckpt")
    five = LoMixSegmentationModule(UNet(1, 5, base_channels=4, depth=3), 5, hd95=False)
    data5 = SyntheticShapesDataModule(num_classes=5, image_size=32, num_train=4, num_val=4, batch_size=4)
    with pytest.raises(ValueError, match="^the checkpoint was trained with num_classes=3 but this model has num_cl"):
        pl.Trainer(max_epochs=2, **trainer_args).fit(five, data5, ckpt_path=tmp_path / "three.ckpt")


def test_validation_labels_outside_the_class_range():
    model = LoMixSegmentationModule(UNet(1, 3, base_channels=4, depth=3), 3, hd95=False, ignore_index=255)
    batch = {"image": torch.randn(1, 1, 16, 16), "mask": torch.full((1, 16, 16), 255)}
    model.validation_step(batch, 0)  # ignore_index is allowed
    batch["mask"][0, 0, :3] = torch.tensor([3, 4, -1])
    with pytest.raises(ValueError, match="^validation labels \\[-1, 3, 4\\] outside \\[0, 2\\] \\(num_classes=3\\)"):
        model.validation_step(batch, 0)


# ---------------------------------------------------------------- the one-line summary itself
def test_summarize_error_shapes():
    union = "\n".join([
        'Parser key "trainer.devices":',
        "  Does not validate against any of the Union subtypes",
        "  Errors:",
        "    - Expected a <class 'int'>",
        "    - Expected a <class 'str'>",
        "    - Expected a <class 'NoneType'>",
        "  Given value type: <class 'str'>",
        "  Given value: x2",
    ])  # fmt: skip
    assert summarize_error(union) == "trainer.devices: invalid value 'x2'; expected int or str"
    nested = "\n".join([
        "Does not validate against any of the Union subtypes",
        "Subtypes: [A, None]",
        "Errors:",
        "  - `num_train` must be an integer >= 1, got 0",
        "  - Expected a <class 'NoneType'>",
        "Given value: N(...)",
    ])  # fmt: skip
    assert summarize_error(nested) == "`num_train` must be an integer >= 1, got 0"
    assert summarize_error("two\n  lines") == "two; lines"
