"""End-to-end journeys: every shipped config through `lomix fit`, `validate`, `test`, `predict` and `export`.

Parametrized over ``configs/*.yaml``: a config without a recipe in ``JOURNEYS`` fails the suite. Each journey
runs on fixture data written in the exact on-disk layout the README documents for its dataset (tests/_fixtures.py),
from the folder the config names (``data/...``), with pretrained weights off and a tiny size by flag. Most run
in-process through ``lomix_lightning.cli.main`` (the console script's own function); one journey per dataset family
runs the installed ``lomix`` script in a subprocess. Run them alone with ``pytest -q -k journey``.
"""

import csv
import math
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from _fixtures import write_acdc, write_busi, write_clinicdb, write_isic2018, write_kvasir, write_synapse
from _subprocess import lomix_command, lomix_env

from lomix_lightning import LoMixSegmentationModule
from lomix_lightning.cli import main
from lomix_lightning.data.synapse import synapse_class_names

CONFIG_DIR = Path(__file__).parents[1] / "configs"
CONFIGS = sorted(p.name for p in CONFIG_DIR.glob("*.yaml"))

SHORT = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=1", "--trainer.limit_val_batches=1"]
SYNTHETIC = [
    "--data.init_args.num_train=8",
    "--data.init_args.num_val=4",
    "--data.init_args.num_test=3",
    "--data.init_args.image_size=32",
    "--data.init_args.batch_size=4",
]
UNET = ["--model.init_args.network.init_args.base_channels=4", "--model.init_args.network.init_args.depth=3"]
PVT = ["--model.init_args.network.init_args.pretrained=false", "--model.init_args.network.init_args.encoder=pvt_v2_b0"]
FILES = ["--data.init_args.img_size=32", "--data.init_args.num_workers=0"]
TRANSUNET_RELEASE = [
    "--data.init_args.root=data/Synapse",
    "--data.init_args.train_dir=train_npz_new",
    "--data.init_args.test_dir=test_vol_h5_new",
    "--data.init_args.list_dir=data/Synapse/lists_Synapse",
    "--data.init_args.class_order=transunet",
]
"""The README's command for the TransUNet/LoMix release (checked by test_readme_release_command_is_the_journeys)."""
SHAPES = ["blob", "lines", "dots"]  # SyntheticShapesDataModule's names of classes 1-3
VOLUMES = [  # demo_3d.yaml at a tiny size: 16^3 training volumes, 24^3 test volumes by a 16^3 sliding window
    "--data.init_args.volume_size=16",
    "--data.init_args.test_volume_size=24",
    "--data.init_args.num_train=2",
    "--data.init_args.num_val=1",
    "--data.init_args.num_test=1",
    "--model.init_args.network.init_args.filters=[4,8,8,16]",
    "--model.init_args.sliding_window.roi_size=16",
]


@dataclass(frozen=True)
class Journey:
    """How to run one config: extra flags, the class rows the test table must print, and what to expect."""

    flags: list[str]
    classes: list[str]
    base: str | None = None  # an add-on config runs on top of this one
    in_channels: int = 1
    size: int = 32
    cases: int = 1  # test cases (images or volumes) the table averages over
    checkpoint: bool = True  # fast_dev_run (debug.yaml) writes none
    subprocess: bool = False  # through the installed console script
    csv_logger: bool = True
    export_format: str = "torchscript"  # torch.export ("export", the default) takes ~10 s: once per network family
    variant: str = ""
    spatial_dims: int = 2  # 3: the exported network takes (B, C, size, size, size)


FOLDER = [*PVT, *FILES, "--data.init_args.batch_size=4"]
SYNAPSE_3D = [  # synapse_3d_dynunet.yaml at a tiny size: 4x16x16 patches of 4x32x32 volumes, a 3-level DynUNet
    "--data.init_args.patch_size=[4,16,16]",
    "--trainer.check_val_every_n_epoch=1",  # the config validates every 5th epoch
    "--data.init_args.samples_per_volume=2",
    "--data.init_args.val_samples_per_volume=1",
    "--data.init_args.num_workers=0",
    "--model.init_args.sliding_window.roi_size=[4,16,16]",
    "--model.init_args.network.init_args.strides=[[1,1,1],[1,2,2],[1,2,2]]",
    "--model.init_args.network.init_args.kernel_size=[3,3,3]",
    "--model.init_args.network.init_args.filters=[4,8,8]",
    "--model.init_args.network.init_args.deep_supr_num=1",
]
JOURNEYS: dict[str, list[Journey]] = {
    "demo.yaml": [Journey([*SYNTHETIC, *UNET], SHAPES, cases=3, subprocess=True, export_format="export")],
    "debug.yaml": [Journey([*SYNTHETIC, *UNET], SHAPES, base="demo.yaml", cases=1, checkpoint=False, csv_logger=False)],
    "wandb.yaml": [Journey([*SYNTHETIC, *UNET], SHAPES, base="demo.yaml", cases=3, csv_logger=False)],
    "pvt_emcad_b2.yaml": [Journey([*SYNTHETIC, *PVT[1:]], SHAPES, cases=3)],
    "smp_unet_resnet34.yaml": [
        Journey(
            [*SYNTHETIC, "--model.init_args.network.init_args.encoder_name=resnet18"],
            SHAPES,
            cases=3,
            export_format="export",
        )
    ],
    "demo_3d.yaml": [Journey(VOLUMES, ["blob", "tubes", "dots"], size=16, spatial_dims=3)],
    "timm_unet.yaml": [Journey(SYNTHETIC, SHAPES, cases=3, export_format="export")],
    "synapse_pvt_emcad_b2.yaml": [
        Journey(
            [*PVT, *FILES, "--data.init_args.batch_size=2"],
            synapse_class_names(9)[1:],
            cases=2,
            variant="prepare-synapse",
        ),
        Journey(
            [*PVT, *FILES, "--data.init_args.batch_size=2", *TRANSUNET_RELEASE],
            synapse_class_names(9, "transunet")[1:],
            cases=2,
            subprocess=True,
            variant="transunet-release",
        ),
    ],  # fmt: skip
    "synapse_3d_dynunet.yaml": [Journey(SYNAPSE_3D, synapse_class_names(9)[1:], cases=2, size=16, spatial_dims=3)],
    "acdc_pvt_emcad_b2.yaml": [
        Journey([*PVT, *FILES, "--data.init_args.batch_size=2"], ["RV", "Myo", "LV"], cases=2, subprocess=True)
    ],
    "kvasir_pvt_emcad_b2.yaml": [Journey(FOLDER, ["polyp"], in_channels=3, subprocess=True, export_format="export")],
    "clinicdb_pvt_emcad_b2.yaml": [Journey(FOLDER, ["polyp"], in_channels=3)],
    "isic2018_pvt_emcad_b2.yaml": [Journey(FOLDER, ["lesion"], in_channels=3)],
    "busi_pvt_emcad_b2.yaml": [Journey(FOLDER, ["tumour"], in_channels=3)],
}

PARAMS = [
    pytest.param(name, journey, id=f"{name}-{journey.variant}" if journey and journey.variant else name,
                 marks=[pytest.mark.slow] if journey and journey.subprocess else [])
    for name in CONFIGS
    for journey in JOURNEYS.get(name, [None])
]  # fmt: skip


@pytest.fixture(autouse=True)
def _one_thread_and_own_wandb_run(one_thread):
    """One intra-op thread (see tests/conftest.py), and no W&B run left behind for the next journey."""
    yield
    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:  # in-process, the next WandbLogger would reuse this run
        wandb.finish()


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """Every dataset, written once per module in the README's layouts under ``<root>/data``."""
    root = tmp_path_factory.mktemp("journey_data")
    data = root / "data"
    cases = ["case0005", "case0006", "case0007"]  # the last two are the validation cases
    write_synapse(data / "synapse", cases, slices=2, size=32, depth=4, train_volumes=True)  # prepare-synapse's layout
    release = data / "Synapse"  # the TransUNet/LoMix release's names
    write_synapse(release, cases, slices=2, size=32, depth=4, labels14=False, train_dir="train_npz_new",
                  test_dir="test_vol_h5_new", list_dir=release / "lists_Synapse")  # fmt: skip
    write_acdc(data / "ACDC", shape=(32, 32), depth=4)
    write_kvasir(data / "Kvasir-SEG")
    write_clinicdb(data / "CVC-ClinicDB")
    write_isic2018(data / "ISIC2018")
    write_busi(data / "BUSI" / "images")
    return root


def _run(journey: Journey, cwd: Path, argv: list[str], capsys) -> tuple[int, str, str]:
    """``lomix ARGV``: the console script in a subprocess for fit, test and export of the subprocess journeys
    (validate and predict there cost ~8 s of start-up each for nothing new), else ``main(argv)`` in-process."""
    if journey.subprocess and argv[0] in ("fit", "test", "export"):
        done = subprocess.run([*lomix_command(), *argv], cwd=cwd, env=lomix_env(), capture_output=True, text=True)
        return done.returncode, done.stdout, done.stderr
    capsys.readouterr()
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def _table_rows(out: str) -> dict[str, list[float]]:
    """``{class: [dice %, hd95, iou %]}`` of the printed per-class table (rich box characters)."""
    rows = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("│").split("│")]
        if len(cells) == 4 and all(re.fullmatch(r"-?\d+\.\d\d|nan", c) for c in cells[1:]):
            rows[cells[0]] = [float(c) for c in cells[1:]]
    return rows


def _logged_test_metrics(cwd: Path) -> dict[str, float]:
    for path in sorted((cwd / "lomix_runs").rglob("metrics.csv"), key=lambda p: p.stat().st_mtime, reverse=True):
        for row in csv.DictReader(path.open()):
            if row.get("test/dice"):
                return {k: float(v) for k, v in row.items() if k.startswith("test/") and v}
    return {}


def _check_table(out: str, journey: Journey, cwd: Path) -> None:
    rows = _table_rows(out)
    assert list(rows) == [*journey.classes, "Mean"], out
    for name in journey.classes:
        dice, hd95, iou = rows[name]
        assert 0 <= iou <= dice + 0.01 <= 100.01 and hd95 >= 0, (name, rows[name])  # per case, IoU = D / (2 - D)
    means = np.array([rows[name] for name in journey.classes]).mean(axis=0)
    np.testing.assert_allclose(rows["Mean"], means, atol=0.011)
    if not journey.csv_logger:
        return
    logged = _logged_test_metrics(cwd)
    assert logged["test/cases"] == journey.cases
    for name in journey.classes:  # the table shows exactly what was logged
        dice, hd95, iou = rows[name]
        assert dice == pytest.approx(100 * logged[f"test/dice/{name}"], abs=0.006)
        assert hd95 == pytest.approx(logged[f"test/hd95/{name}"], abs=0.006)
        assert iou == pytest.approx(100 * logged[f"test/iou/{name}"], abs=0.006)


@pytest.mark.parametrize(("config", "journey"), PARAMS)
def test_journey(config, journey, data_root, tmp_path, monkeypatch, capsys):
    if journey is None:
        pytest.fail(f"configs/{config} has no journey: add its recipe to JOURNEYS in tests/test_journeys.py")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COLUMNS", "200")
    (tmp_path / "data").symlink_to(data_root / "data")
    configs = ["--config", str(CONFIG_DIR / journey.base)] if journey.base else []
    common = [*configs, "--config", str(CONFIG_DIR / config), *journey.flags]

    code, out, err = _run(journey, tmp_path, ["fit", *common, *SHORT], capsys)
    assert code == 0, err[-3000:]
    assert "lomix fit finished." in out
    checkpoints = sorted(tmp_path.glob("lomix_runs/**/checkpoints/last.ckpt"))
    if not journey.checkpoint:  # fast_dev_run: one batch, no checkpoint, by Lightning's design
        assert checkpoints == [], checkpoints
        ckpt = []
    else:
        assert len(checkpoints) == 1, checkpoints
        ckpt = ["--ckpt_path", str(checkpoints[0])]

    code, out, err = _run(journey, tmp_path, ["validate", *common, "--trainer.limit_val_batches=1", *ckpt], capsys)
    assert code == 0, err[-3000:]
    assert "val/dice" in out

    code, out, err = _run(journey, tmp_path, ["test", *common, *ckpt], capsys)
    assert code == 0, err[-3000:]
    _check_table(out, journey, tmp_path)

    code, out, err = _run(journey, tmp_path, ["predict", *common, "--trainer.limit_predict_batches=2", *ckpt], capsys)
    assert code == 0, err[-3000:]
    assert re.search(r"lomix predict finished: [1-9]\d* label maps of shape \(", out), out

    if not journey.checkpoint:
        return
    # torch.export (the default format) once per network family, TorchScript elsewhere; both run without lomix
    fmt = journey.export_format
    exported = tmp_path / ("net.pt2" if fmt == "export" else "net.ts")
    argv = ["export", "--ckpt_path", str(checkpoints[0]), "--output", str(exported), "--input_size", str(journey.size)]
    code, out, err = _run(journey, tmp_path, [*argv, "--format", fmt], capsys)
    assert code == 0, err[-3000:]
    assert f"exported the prediction network ({fmt}) to {exported}" in out
    network = torch.export.load(exported).module() if fmt == "export" else torch.jit.load(str(exported))
    x = torch.randn(2 if fmt == "torchscript" else 3, journey.in_channels, *[journey.size] * journey.spatial_dims)
    model = LoMixSegmentationModule.load_from_checkpoint(checkpoints[0], weights_only=True).eval()
    with torch.no_grad():
        expected = model(x)
        got = network(x)
    assert got.shape == (len(x), max(model.num_classes, 1), *[journey.size] * journey.spatial_dims) and math.isfinite(
        float(got.sum())
    )
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_readme_release_command_is_the_journeys():
    readme = (CONFIG_DIR.parent / "README.md").read_text()
    block = readme.split("The TransUNet/LoMix preprocessed release works", 1)[1].split("```bash\n", 1)[1]
    command = block.split("```", 1)[0].replace("\\\n", " ").split()
    assert command[:4] == ["lomix", "fit", "--config", "configs/synapse_pvt_emcad_b2.yaml"]
    assert command[4:] == TRANSUNET_RELEASE
    assert "pytest -q -k journey" in readme.split("## Development", 1)[1]
