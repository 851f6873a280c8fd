"""Test helper (not collected): run the `lomix` console script in a subprocess with the fast demo flags."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).parent

DATA = [
    "--trainer.limit_train_batches=2",
    "--trainer.limit_val_batches=1",
    "--data.init_args.num_train=16",
    "--data.init_args.num_val=8",
    "--data.init_args.image_size=32",
    "--data.init_args.batch_size=4",
    "--model.init_args.hd95=false",
]
"""A short demo run, for any network."""

FAST = [
    *DATA,
    "--model.init_args.network.init_args.base_channels=4",
    "--model.init_args.network.init_args.depth=3",
]
"""A short demo run with a tiny demo U-Net."""


def lomix_command() -> list[str]:
    """The installed `lomix` script (next to the interpreter), else skip."""
    script = Path(sys.executable).parent / "lomix"
    if not script.is_file():
        pytest.skip("the lomix console script is not installed next to the interpreter")
    return [str(script)]


def lomix_env(**extra: str) -> dict[str, str]:
    """The environment of a test subprocess: offline, quiet, with tests/ importable (for helper callbacks)."""
    env = dict(os.environ)
    env.update(NO_ALBUMENTATIONS_UPDATE="1", WANDB_MODE="offline", WANDB_SILENT="true", COLUMNS="200")
    env["OMP_NUM_THREADS"] = "1"  # two threads per process spin against each other on a 2-core runner
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def start(args: list[str], cwd: Path, **env: str) -> subprocess.Popen:
    """Start `lomix ARGS` in ``cwd``; stdout and stderr go to ``cwd/stdout.txt`` and ``cwd/stderr.txt``.

    Files, not pipes: a long run cannot block on a full pipe while the test waits for it.
    """
    with (cwd / "stdout.txt").open("w") as out, (cwd / "stderr.txt").open("w") as err:
        return subprocess.Popen([*lomix_command(), *args], cwd=cwd, env=lomix_env(**env), stdout=out, stderr=err)


def outputs(cwd: Path) -> tuple[str, str]:
    """The stdout and stderr written by :func:`start`."""
    return (cwd / "stdout.txt").read_text(), (cwd / "stderr.txt").read_text()
