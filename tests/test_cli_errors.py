"""The CLI error policy: a user's mistake is one line and exit 2; a failure in code is one internal-error line, exit 1.

Also the one-line errors of issue #17 (item 5), the checkpoint's ``num_classes`` against an explicit one (item 6),
``img_size`` following the data (issue #13), and the binary protocol from the command line.
"""

import os
from pathlib import Path

import pytest
import torch
from _fixtures import write_kvasir
from _subprocess import FAST
from torch import nn

from lomix_lightning import LoMixSegmentationModule
from lomix_lightning.cli import TRACEBACK_ENV, main, user_error_message
from lomix_lightning.errors import LomixUserError
from lomix_lightning.models import UNet

ONE_EPOCH = ["--trainer.max_epochs=1"]


@pytest.fixture(autouse=True)
def _one_thread_no_traceback(monkeypatch):
    monkeypatch.delenv(TRACEBACK_ENV, raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _fail(capsys, argv, code):
    """Run ``lomix ARGV``; the exit status must be ``code`` and stderr end in one ``lomix: ...`` line."""
    capsys.readouterr()
    assert main(argv) == code
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert lines, "nothing on stderr"
    assert "usage:" not in err
    return err, lines[-1]


def _user_error(capsys, argv):
    err, line = _fail(capsys, argv, 2)
    assert "Traceback" not in err
    assert line.startswith("lomix: error: "), err
    return line


@pytest.fixture(scope="module")
def demo_checkpoint(tmp_path_factory):
    """A 3-class demo checkpoint (one short epoch)."""
    root = tmp_path_factory.mktemp("demo_ckpt")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        assert main(["fit", *FAST, *ONE_EPOCH, "--model.num_classes=3"]) == 0
    finally:
        os.chdir(cwd)
    return next(root.glob("lomix_runs/**/checkpoints/last.ckpt"))


# ---------------------------------------------------------------- internal errors
class BuggyModule(LoMixSegmentationModule):
    """A bug of ours: the TypeError the binary test table used to raise."""

    def training_step(self, batch, batch_idx):
        return len(torch.tensor(1.0).numpy())  # TypeError: len() of unsized object


class TorchValueErrorNet(nn.Module):
    """A network on which torch raises a ValueError: that is no mistake in the user's options or data."""

    def __init__(self, in_channels: int = 1, num_classes: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, num_classes, 1)
        self.norm = nn.BatchNorm1d(num_classes)

    def forward(self, x):
        pooled = self.norm(self.conv(x)[:1].mean(dim=(2, 3)))  # (1, C): "Expected more than 1 value per channel"
        return self.conv(x) + pooled[:, :, None, None]


def test_internal_error_is_one_line_exit_1_with_the_way_to_the_traceback(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = ["fit", *FAST, *ONE_EPOCH, f"--model.class_path={__name__}.BuggyModule"]
    err, line = _fail(capsys, argv, 1)
    assert "Traceback" not in err
    assert line.startswith("lomix: internal error: TypeError: len() of unsized object (")
    assert f"rerun with {TRACEBACK_ENV}=1 to see the traceback" in line

    monkeypatch.setenv(TRACEBACK_ENV, "1")
    err, line = _fail(capsys, argv, 1)
    assert "Traceback (most recent call last)" in err and "in training_step" in err
    assert line.startswith("lomix: internal error: TypeError: len() of unsized object")


def test_a_value_error_from_inside_torch_is_internal_not_a_user_error(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    network = [f"--model.init_args.network.class_path={__name__}.TorchValueErrorNet",
               "--model.init_args.supervision=last_layer", "--model.init_args.num_outputs=1"]  # fmt: skip
    _, line = _fail(capsys, ["fit", *FAST[:7], *ONE_EPOCH, *network], 1)
    assert line.startswith("lomix: internal error: ValueError: Expected more than 1 value per channel"), line


def test_classification_of_exceptions():
    assert user_error_message(LomixUserError("`depth` must be a positive integer, got 0.")) == (
        "`depth` must be a positive integer, got 0."
    )
    assert user_error_message(FileNotFoundError("list file not found: x.txt")) == "list file not found: x.txt"
    assert user_error_message(ValueError("Expected more than 1 value per channel when training")) is None
    assert user_error_message(TypeError("len() of unsized object")) is None
    assert user_error_message(RuntimeError("shape mismatch")) is None
    worker = LomixUserError(
        "Caught LomixUserError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
        "  File ...\nlomix_lightning.errors.LomixUserError: cannot read the image x"
    )
    assert user_error_message(worker) == "cannot read the image x"


# ---------------------------------------------------------------- user errors of issue #17, item 5
def test_truncated_checkpoint_in_test_and_export(capsys, tmp_path, monkeypatch, demo_checkpoint):
    monkeypatch.chdir(tmp_path)
    data = demo_checkpoint.read_bytes()
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(data[: len(data) // 2])
    line = _user_error(capsys, ["test", *FAST, "--ckpt_path", str(truncated)])
    assert f"checkpoint '{truncated}' is not a readable PyTorch checkpoint (truncated or damaged?)" in line
    line = _user_error(capsys, ["export", "--ckpt_path", str(truncated), "--output", "x.pt2"])
    assert "is not a readable PyTorch checkpoint (truncated or damaged?)" in line


def test_checkpoint_path_is_a_directory(capsys, tmp_path, monkeypatch, demo_checkpoint):
    monkeypatch.chdir(tmp_path)
    folder = demo_checkpoint.parent
    for argv in (["test", *FAST, "--ckpt_path", str(folder)], ["export", "--ckpt_path", str(folder), "--output", "x"]):
        assert f"checkpoint '{folder}' is a directory; give a checkpoint file" in _user_error(capsys, argv)


def test_checkpoint_with_a_pickled_object_needs_unpickling(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"state_dict": {}, "hyper_parameters": {"hook": os.system}}, tmp_path / "blocked.ckpt")
    line = _user_error(capsys, ["test", "--ckpt_path", "blocked.ckpt"])  # torch: "unsupported GLOBAL ... blocked"
    assert f"pickled object ({os.system.__module__}.system) and needs unpickling" in line and "damaged" not in line
    torch.save({"state_dict": {}, "hyper_parameters": {"x": UNet}}, tmp_path / "class.ckpt")
    line = _user_error(capsys, ["export", "--ckpt_path", "class.ckpt", "--output", "x.pt2"])
    assert "pickled object (lomix_lightning.models.unet.UNet) and needs unpickling" in line


def test_corrupt_image_in_a_folder_dataset(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    images, masks = write_kvasir(tmp_path / "Kvasir-SEG", n=5)
    for path in images.iterdir():
        path.write_bytes(b"\x89PNG\r\n\x1a\n but not really")
    argv = ["fit", "--data=lomix_lightning.data.FolderSegmentationDataModule", f"--data.images_dir={images}",
            f"--data.masks_dir={masks}", "--data.img_size=32", "--model.num_classes=1", "--model.loss=structure",
            *FAST[:2], *FAST[-2:], *ONE_EPOCH]  # fmt: skip
    line = _user_error(capsys, argv)
    assert f"cannot read the image file {images}" in line and "cannot identify image file" in line


def test_network_deeper_than_the_image_allows(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    line = _user_error(capsys, ["fit", *FAST, *ONE_EPOCH, "--model.init_args.network.init_args.depth=8"])
    assert "a UNet of depth=8 halves the image 8 times and needs at least 256x256 pixels, got (32, 32)" in line


def test_export_input_size_zero_and_bad_export_flags(capsys, tmp_path, monkeypatch, demo_checkpoint):
    monkeypatch.chdir(tmp_path)
    argv = ["export", "--ckpt_path", str(demo_checkpoint), "--output", "x.pt2"]
    assert "--input_size must be a positive integer, got 0" in _user_error(capsys, [*argv, "--input_size", "0"])
    line = _user_error(capsys, [*argv, "--format", "onnx"])
    assert line.startswith("lomix: error: lomix export: argument --format: invalid choice: 'onnx'")


def test_empty_yaml_config(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty.yaml").write_text("# nothing yet\n")
    line = _user_error(capsys, ["fit", "--config", "empty.yaml"])
    assert "config file 'empty.yaml' is empty (or only comments)" in line
    (tmp_path / "list.yaml").write_text("- trainer\n")
    assert "must hold a mapping of options" in _user_error(capsys, ["fit", "--config", "list.yaml"])


# ---------------------------------------------------------------- issue #17, item 6: num_classes vs the checkpoint
@pytest.mark.parametrize("subcommand", ["test", "fit"])
def test_explicit_num_classes_contradicting_the_checkpoint(capsys, tmp_path, monkeypatch, demo_checkpoint, subcommand):
    monkeypatch.chdir(tmp_path)
    line = _user_error(capsys, [subcommand, *FAST, "--model.num_classes=5", "--ckpt_path", str(demo_checkpoint)])
    assert f"model.num_classes=5 contradicts the checkpoint '{demo_checkpoint}', trained with num_classes=3" in line
    config = tmp_path / "five.yaml"
    config.write_text("model:\n  init_args:\n    num_classes: 5\n")
    line = _user_error(capsys, [subcommand, "--config", str(config), *FAST, "--ckpt_path", str(demo_checkpoint)])
    assert "model.num_classes=5 contradicts the checkpoint" in line


def test_checkpoint_num_classes_is_used_when_none_is_given(capsys, tmp_path, monkeypatch, demo_checkpoint):
    monkeypatch.chdir(tmp_path)
    assert main(["test", *FAST, "--ckpt_path", str(demo_checkpoint)]) == 0  # the demo default is 4; the ckpt's 3
    out = capsys.readouterr().out
    assert "blob" in out and "lines" in out and "dots" not in out


# ---------------------------------------------------------------- img_size follows the data (issue #13)
def test_img_size_is_no_hyper_parameter_unless_given():
    net = UNet(1, 3, base_channels=4, depth=3)
    assert "img_size" not in LoMixSegmentationModule(net, 3).hparams
    assert LoMixSegmentationModule(net, 3, img_size=64).hparams["img_size"] == 64


def test_img_size_contradicting_the_data_is_one_line(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    images, masks = write_kvasir(tmp_path / "Kvasir-SEG", n=5)
    argv = ["fit", "--data=lomix_lightning.data.FolderSegmentationDataModule", f"--data.images_dir={images}",
            f"--data.masks_dir={masks}", "--data.img_size=32", "--model.num_classes=1", "--model.loss=structure",
            "--model.init_args.img_size=64", *FAST[:2], *FAST[-2:], *ONE_EPOCH]  # fmt: skip
    line = _user_error(capsys, argv)
    assert "model.img_size=64 contradicts data.img_size=32 (FolderSegmentationDataModule)" in line


# ---------------------------------------------------------------- the binary protocol from the command line (#13)
def test_binary_protocol_fit_and_test_from_the_cli(capsys, tmp_path, monkeypatch):
    """Issue #13's repro, as written there (no --model.img_size), plus `lomix test` of its checkpoint."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COLUMNS", "200")
    images, masks = write_kvasir(tmp_path / "data", n=10)
    binary = ["--data", "lomix_lightning.data.FolderSegmentationDataModule", "--data.images_dir", str(images),
              "--data.masks_dir", str(masks), "--data.img_size", "32", "--model.num_classes", "1", "--model.loss",
              "structure", "--model.inference_output", "sum", *FAST[:2], *FAST[-2:]]  # fmt: skip
    assert main(["fit", *binary, *ONE_EPOCH]) == 0
    ckpt = next(tmp_path.glob("lomix_runs/**/checkpoints/last.ckpt"))
    capsys.readouterr()
    assert main(["test", *binary, "--ckpt_path", str(ckpt)]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if "│ foreground" in line)
    dice, hd95, iou = (float(cell) for cell in row.strip().strip("│").split("│")[1:])
    assert 0 <= iou <= dice <= 100 and hd95 >= 0


def test_mask_reading_errors_name_the_file(tmp_path):
    from lomix_lightning.data.components.pairs import FolderPair, load_pair

    bad = tmp_path / "a.png"
    bad.write_bytes(b"")
    with pytest.raises(LomixUserError, match=f"cannot read the image file {bad}"):
        load_pair(FolderPair("a", bad, bad))


def test_user_error_in_a_class_init_wrapped_by_jsonargparse_stays_a_user_error(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = str(Path(__file__).parents[1] / "configs" / "timm_unet.yaml")
    argv = ["fit", "--config", config, "--model.init_args.network.init_args.encoder_name=no_such_net"]
    line = _user_error(capsys, argv)  # jsonargparse raises ValueError("Does not validate ...") from our error
    assert line == "lomix: error: `encoder_name` 'no_such_net' is not a timm model (see `timm.list_models()`)."
