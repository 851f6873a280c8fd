"""SIGTERM and Ctrl-C during `lomix fit` (real subprocesses): a loadable checkpoint, a non-zero exit, one line."""

import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from _subprocess import FAST, outputs, start

from lomix_lightning import LoMixSegmentationModule
from lomix_lightning.cli import LoMixCLI

pytestmark = pytest.mark.slow


def _wait_for(path: Path, process: subprocess.Popen, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.is_file():
        if process.poll() is not None:
            pytest.fail(f"lomix fit exited ({process.returncode}) before writing {path}: {outputs(path.parents[4])[1]}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"{path} did not appear within {timeout} s")
        time.sleep(0.2)
    time.sleep(0.5)  # let the epoch's checkpoint finish writing and the next epoch start


def _interrupt(tmp_path: Path, signum: int) -> tuple[int, str, Path]:
    process = start(["fit", *FAST, "--trainer.max_epochs=500"], tmp_path)
    run = tmp_path / "lomix_runs" / "demo" / "version_0"
    _wait_for(run / "checkpoints" / "last.ckpt", process)
    process.send_signal(signum)
    try:
        code = process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail(f"lomix fit did not stop within 60 s of {signal.Signals(signum).name}")
    stderr = outputs(tmp_path)[1]
    return code, stderr, run


def _check_checkpoint(path: Path) -> dict:
    checkpoint = torch.load(path, weights_only=True)  # plain data only: no code is unpickled
    assert {"state_dict", "optimizer_states", "loops", "callbacks", "hyper_parameters"} <= set(checkpoint)
    callbacks = {key.split("{")[0] for key in checkpoint["callbacks"]}
    assert {"WeightTrajectoryLogger", "BestEpochWeightBarChart", "ModelCheckpoint"} <= callbacks
    model = LoMixSegmentationModule.load_from_checkpoint(path, weights_only=True)
    torch.testing.assert_close(model.criterion.weighting.alpha, checkpoint["state_dict"]["criterion.weighting.alpha"])
    return checkpoint


def test_sigterm_saves_a_resumable_checkpoint_and_exits_143(tmp_path, monkeypatch):
    code, stderr, run = _interrupt(tmp_path, signal.SIGTERM)
    assert code == 128 + signal.SIGTERM, stderr[-2000:]
    last_line = stderr.strip().splitlines()[-1]
    assert last_line.startswith("lomix: interrupted (SIGTERM) at epoch "), stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    saved = Path(last_line.split("checkpoint saved to ")[1].split(" (resume")[0])
    path = tmp_path / saved
    assert path == run / "checkpoints" / "interrupted.ckpt" and path.is_file()
    checkpoint = _check_checkpoint(path)
    assert checkpoint["global_step"] >= 2 and f"step {checkpoint['global_step']};" in last_line

    # the checkpoint resumes: training continues from the interrupted step
    monkeypatch.chdir(tmp_path)
    epochs = checkpoint["epoch"] + 2
    cli = LoMixCLI(args=["fit", *FAST, f"--trainer.max_epochs={epochs}", "--ckpt_path", str(path)])
    assert cli.trainer.current_epoch == epochs and cli.trainer.global_step > checkpoint["global_step"]


def test_ctrl_c_stops_at_a_batch_boundary_with_a_checkpoint_and_exits_130(tmp_path):
    code, stderr, run = _interrupt(tmp_path, signal.SIGINT)
    assert code == 128 + signal.SIGINT, stderr[-2000:]
    last_line = stderr.strip().splitlines()[-1]
    assert last_line.startswith("lomix: interrupted (SIGINT) at epoch "), stderr[-3000:]
    assert "Traceback" not in stderr and "Ctrl-C again aborts" in stderr, stderr[-3000:]
    _check_checkpoint(run / "checkpoints" / "interrupted.ckpt")
