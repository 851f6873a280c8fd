"""Data modules with a fixed class count refuse another one when the command line is parsed (issue #14)."""

from pathlib import Path

import pytest

from lomix_lightning.cli import main
from lomix_lightning.data import ACDCDataModule, FolderSegmentationDataModule

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.parametrize(
    ("config", "flag", "allowed"),
    [
        ("acdc_pvt_emcad_b2.yaml", "--model.init_args.num_classes=5", 4),
        ("acdc_pvt_emcad_b2.yaml", "--model.num_classes=3", 4),
        ("kvasir_pvt_emcad_b2.yaml", "--model.init_args.num_classes=2", 1),
    ],
)
def test_cli_refuses_another_class_count_at_parse_time(capsys, config, flag, allowed):
    capsys.readouterr()
    assert main(["fit", "--config", str(CONFIGS / config), flag]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    asked = flag.rsplit("=", 1)[1]
    assert err == [f"lomix: error: data.init_args.num_classes: invalid value '{asked}'; expected one of {allowed}"]


@pytest.mark.parametrize(("config", "count"), [("acdc_pvt_emcad_b2.yaml", 4), ("kvasir_pvt_emcad_b2.yaml", 1)])
def test_the_configs_own_class_count_parses(capsys, config, count):
    with pytest.raises(SystemExit) as done:  # --print_config prints the parsed config and exits
        main(["fit", "--config", str(CONFIGS / config), "--print_config"])
    assert done.value.code == 0
    assert f"    num_classes: {count}\n" in capsys.readouterr().out  # the model's; the data's follows by the link


@pytest.mark.parametrize(
    ("cls", "args", "allowed", "asked", "match"),
    [
        (ACDCDataModule, ("x",), 4, 5, r"^ACDCDataModule has num_classes=4 \(background, RV, Myo, LV\), got 5$"),
        (ACDCDataModule, ("x",), 4, True, r"^ACDCDataModule has num_classes=4 .*, got True$"),
        (FolderSegmentationDataModule, ("i", "m"), 1, 2, r"^FolderSegmentationDataModule has num_classes=1 .*, got 2$"),
    ],
)
def test_python_construction_refuses_another_class_count(cls, args, allowed, asked, match):
    with pytest.raises(ValueError, match=match):
        cls(*args, num_classes=asked)
    assert cls(*args, num_classes=allowed).num_classes == cls(*args).num_classes == allowed
