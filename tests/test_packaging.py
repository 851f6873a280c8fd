"""`callbacks/` installs as `lomix_lightning.callbacks` (never as a top-level `callbacks`), editable or not."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


def test_editable_or_installed_import():
    import lomix_lightning.callbacks as callbacks

    assert {"WeightTrajectoryLogger", "BestEpochWeightBarChart"} <= set(callbacks.__all__)
    assert Path(callbacks.__file__).parent.name in {"callbacks"}


def test_package_list_matches_the_tree():
    """pyproject lists packages explicitly (callbacks/ is remapped); a new sub-package must be added there."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    found = {"lomix_lightning." + ".".join(p.parent.relative_to(ROOT / "lomix_lightning").parts)
             for p in (ROOT / "lomix_lightning").rglob("__init__.py")}  # fmt: skip
    found = {f.rstrip(".") for f in found} | {"lomix_lightning.callbacks"}
    assert listed == found
    assert config["package-dir"]["lomix_lightning.callbacks"] == "callbacks"


@pytest.mark.slow
def test_regular_install_imports_callbacks(tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", "--target", str(target),
         str(ROOT)],
        check=True,
        cwd=tmp_path,
    )  # fmt: skip
    assert not (target / "callbacks").exists()  # nothing named `callbacks` lands in site-packages
    assert (target / "lomix_lightning" / "callbacks" / "trajectory.py").is_file()
    assert (target / "lomix_lightning" / "_engine" / "ce_dice.c").is_file()  # the kernels' source ships
    code = "import lomix_lightning.callbacks as c, lomix_lightning as l; print(c.__file__); print(l.__file__)"
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=tmp_path,
        env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin", "NO_ALBUMENTATIONS_UPDATE": "1"},
    ).stdout.split()  # fmt: skip
    assert all(line.startswith(str(target)) for line in out)
