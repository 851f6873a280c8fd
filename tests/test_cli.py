"""The `lomix` CLI: every config parses, fit -> test -> predict -> export round trip, links and user subclasses."""

from pathlib import Path

import pytest
import torch
import yaml

from lomix_lightning import LoMixSegmentationModule
from lomix_lightning.cli import LoMixCLI, main

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))
PARTIAL = {"wandb.yaml", "debug.yaml"}  # meant to be combined with another config

FAST = [
    "--trainer.max_epochs=2",
    "--trainer.limit_train_batches=2",
    "--trainer.limit_val_batches=1",
    "--trainer.limit_test_batches=1",
    "--trainer.limit_predict_batches=1",
    "--data.init_args.num_train=16",
    "--data.init_args.num_val=8",
    "--data.init_args.num_test=8",
    "--data.init_args.image_size=32",
    "--model.init_args.network.init_args.base_channels=4",
    "--model.init_args.network.init_args.depth=3",
]


class CountingModule(LoMixSegmentationModule):
    """A user subclass that overrides one hook."""

    calls = 0

    def on_train_epoch_start(self):
        CountingModule.calls += 1


def _network_overrides(path: Path) -> list[str]:
    """No downloads in tests: switch pretrained encoders off."""
    network = yaml.safe_load(path.read_text()).get("model", {}).get("init_args", {}).get("network", {})
    args = network.get("init_args", {})
    if args.get("pretrained"):
        return ["--model.init_args.network.init_args.pretrained=false"]
    if args.get("encoder_weights"):
        return ["--model.init_args.network.init_args.encoder_weights=null"]
    return []


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_config_parses_and_instantiates(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    configs = ["--config", str(CONFIGS[0].parent / "demo.yaml")] if path.name in PARTIAL else []
    cli = LoMixCLI(args=[*configs, "--config", str(path), *_network_overrides(path)], run=False)
    assert isinstance(cli.model, LoMixSegmentationModule)
    assert cli.model.network.num_classes == cli.model.num_classes
    assert cli.model.class_names == list(cli.datamodule.class_names) or cli.model.num_classes == 1
    if path.name == "wandb.yaml":
        assert type(cli.trainer.logger).__name__ == "WandbLogger"
    if path.name == "demo.yaml":  # demo.yaml spells out exactly what `lomix fit` does with no arguments
        default = LoMixCLI(args=[], run=False)
        assert default.model.hparams == cli.model.hparams
        assert [type(c) for c in default.trainer.callbacks] == [type(c) for c in cli.trainer.callbacks]
        assert default.trainer.max_epochs == cli.trainer.max_epochs


def test_num_classes_flag_reaches_network_and_data(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = LoMixCLI(args=["--model.num_classes=3", "--data.init_args.in_channels=3"], run=False)
    assert cli.model.num_classes == cli.model.network.num_classes == cli.datamodule.num_classes == 3
    assert cli.model.network.in_channels == 3
    assert cli.model.class_names == cli.datamodule.class_names


def test_round_trip_fit_test_predict_export(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = LoMixCLI(args=["fit", *FAST, "--model.num_classes=3"])
    last = Path(cli.trainer.log_dir) / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["epoch"] == 1  # rewritten every epoch
    assert Path(cli.trainer.checkpoint_callback.best_model_path).name.startswith("best-")
    fitted = cli.model
    run_dir = Path(cli.trainer.log_dir)
    assert (run_dir / "lomix_weights" / "weights.csv").is_file()  # the demo's callbacks wrote their files

    test_cli = LoMixCLI(args=["test", *FAST, "--model.num_classes=3", "--ckpt_path", str(last)])
    assert "test/dice" in test_cli.trainer.callback_metrics
    predict_cli = LoMixCLI(args=["predict", *FAST, "--model.num_classes=3", "--ckpt_path", str(last)])
    assert predict_cli.trainer.predict_loop.predictions[0].dtype == torch.long

    # CLI-built checkpoints load without the CLI, with weights_only=True, and restore alpha exactly
    loaded = LoMixSegmentationModule.load_from_checkpoint(last, weights_only=True)
    assert torch.equal(loaded.criterion.weighting.alpha, fitted.criterion.weighting.alpha)
    assert loaded.network.num_classes == 3 and loaded.network.encoder.blocks[0][0].out_channels == 4

    x = torch.randn(3, 1, 32, 32)
    expected = loaded.eval()(x)
    assert main(["export", "--ckpt_path", str(last), "--output", str(tmp_path / "net.pt2"), "--input_size", "32"]) == 0
    program = torch.export.load(tmp_path / "net.pt2")
    torch.testing.assert_close(program.module()(x), expected, rtol=1e-4, atol=1e-4)
    exported = loaded.export_network()
    aux = sum(p.numel() for h in loaded.network.auxiliary_heads() for p in h.parameters())
    assert sum(p.numel() for p in exported.parameters()) == sum(p.numel() for p in loaded.network.parameters()) - aux

    assert main(["export", "--ckpt_path", str(last), "--output", str(tmp_path / "net.ts"), "--format", "torchscript",
                 "--input_size", "32"]) == 0  # fmt: skip
    torch.testing.assert_close(torch.jit.load(str(tmp_path / "net.ts"))(x[:2]), expected[:2], rtol=1e-4, atol=1e-4)


def test_user_subclass_via_model_class_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    CountingModule.calls = 0
    cli = LoMixCLI(args=["fit", *FAST, f"--model.class_path={__name__}.CountingModule"])
    assert isinstance(cli.model, CountingModule)
    assert CountingModule.calls == 2


def test_bad_value_names_it(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        LoMixCLI(args=["--model.init_args.supervision=lomx"], run=False)
    err = capsys.readouterr().err
    assert "lomx" in err and "deep_supervision" in err
    assert main(["export", "--ckpt_path", str(tmp_path / "missing.ckpt"), "--output", "x.pt2"]) == 2
    assert "missing.ckpt" in capsys.readouterr().err


def test_prepare_synapse_subcommand(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["prepare-synapse", "--help"])
    assert exit_info.value.code == 0 and "RAW_DIR" in capsys.readouterr().out.upper()
    assert main(["prepare-synapse", str(tmp_path / "nowhere"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lomix: error:") and "nowhere" in err[0]
