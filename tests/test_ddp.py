"""DDP on two CPU processes (gloo): `lomix fit` completes, ranks agree, files are written once, nothing is unused."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _subprocess import FAST, TESTS, lomix_command, lomix_env, outputs, start

from lomix_lightning import LoMixSegmentationModule

pytestmark = pytest.mark.slow

DDP = ["--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.accelerator=cpu"]
PROBE = ["--trainer.callbacks+=_ddp_probe.RankStateDump"]  # tests/_ddp_probe.py, importable via PYTHONPATH


def _wait(process: subprocess.Popen, cwd: Path, timeout: float = 240) -> tuple[str, str]:
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail(f"timed out (a deadlock?): {outputs(cwd)[1][-3000:]}")
    stdout, stderr = outputs(cwd)
    assert process.returncode == 0, stderr[-3000:]
    return stdout, stderr


def _ranks(folder: Path, prefix: str = "") -> tuple[dict, dict]:
    return tuple(torch.load(folder / f"{prefix}rank{r}.pt", weights_only=True) for r in (0, 1))


def _assert_same(rank0: dict, rank1: dict) -> None:
    assert rank0["world_size"] == rank1["world_size"] == 2
    assert rank0["params"].keys() == rank1["params"].keys()
    for name, value in rank0["params"].items():
        assert torch.equal(value, rank1["params"][name]), f"{name} differs between ranks"
    assert rank0["missing_grads"] == rank1["missing_grads"] == []  # every registered parameter got a gradient
    assert rank0["steps_checked"] == rank1["steps_checked"] > 0


def _check_run(cwd: Path, stdout: str, stderr: str) -> Path:
    assert stdout.count("lomix fit finished.") == 1  # rank 0 reports once
    assert "Traceback" not in stderr
    runs = sorted((cwd / "lomix_runs" / "demo").iterdir())
    assert [r.name for r in runs] == ["version_0"]  # one run directory, not one per rank
    run = runs[0]
    for name in ("weights.csv", "best_val_dice_max.csv", "best_val_dice_max.png", "operator_sums.png"):
        assert [p.relative_to(cwd) for p in cwd.rglob(name)] == [(run / "lomix_weights" / name).relative_to(cwd)]
    rank0, rank1 = _ranks(cwd / "dump")
    _assert_same(rank0, rank1)
    assert rank0["callbacks"] == rank1["callbacks"]  # weight history and best-epoch snapshot agree
    assert list(rank0["callbacks"]["WeightTrajectoryLogger"]["history"]) == [0, 1]
    assert rank0["metrics"]["val/dice"] == rank1["metrics"]["val/dice"]
    last = run / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, weights_only=True)
    assert checkpoint["global_step"] == rank0["global_step"] == 4
    model = LoMixSegmentationModule.load_from_checkpoint(last, weights_only=True)
    torch.testing.assert_close(model.criterion.weighting.alpha, rank0["params"]["criterion.weighting.alpha"])
    return run


def test_lomix_fit_with_ddp_on_two_cpu_processes(tmp_path):
    args = ["fit", *FAST, "--trainer.max_epochs=2", *DDP, *PROBE]
    process = start(args, tmp_path, LOMIX_TEST_DUMP=str(tmp_path / "dump"))
    _check_run(tmp_path, *_wait(process, tmp_path))


def test_lomix_fit_under_torchrun(tmp_path):
    torchrun = Path(sys.executable).parent / "torchrun"
    if not torchrun.is_file():
        pytest.skip("torchrun is not installed next to the interpreter")
    command = [str(torchrun), "--standalone", "--nproc_per_node=2", *lomix_command()]
    args = ["fit", *FAST, "--trainer.max_epochs=2", *DDP, *PROBE]
    with (tmp_path / "stdout.txt").open("w") as out, (tmp_path / "stderr.txt").open("w") as err:
        env = lomix_env(LOMIX_TEST_DUMP=str(tmp_path / "dump"))
        process = subprocess.Popen([*command, *args], cwd=tmp_path, env=env, stdout=out, stderr=err)
    _check_run(tmp_path, *_wait(process, tmp_path))


def test_every_scheme_and_operator_subset_under_ddp(tmp_path):
    """One launch, nine fits (tests/_ddp_script.py): no unused parameter, identical ranks, DDP-safe non-finite."""
    command = [sys.executable, str(TESTS / "_ddp_script.py"), str(tmp_path)]
    with (tmp_path / "stdout.txt").open("w") as out, (tmp_path / "stderr.txt").open("w") as err:
        process = subprocess.Popen(command, cwd=tmp_path, env=lomix_env(), stdout=out, stderr=err)
    _wait(process, tmp_path)
    cases = ["last_layer", "deep_supervision", "mutation", "lomix", "lomix_mul", "lomix_cat_awf"]
    for case in [*cases, "learned_deep_supervision", "aligned", "uncertainty", "skip_nonfinite"]:
        rank0, rank1 = _ranks(tmp_path, f"{case}_")
        _assert_same(rank0, rank1)
        assert rank0["global_step"] == 2
        skipped = case == "skip_nonfinite"
        assert rank0["skipped"] == rank1["skipped"] == int(skipped)
        assert rank0["adam_steps"] == [1.0 if skipped else 2.0], case  # the poisoned step updated nothing
    aligned = _ranks(tmp_path, "aligned_")[0]["params"]  # probed at step 0 on both ranks' batches (all-reduced)
    assert int(aligned["criterion.weighting.probes"]) == 1 and aligned["criterion.weighting.alignment"].abs().sum() > 0
    fusion = {case: {k.split(".")[2] for k in _ranks(tmp_path, f"{case}_")[0]["params"] if ".mutation." in k}
              for case in cases}  # fmt: skip
    assert fusion == {"last_layer": set(), "deep_supervision": set(), "mutation": set(), "lomix": {"cat", "awf"},
                      "lomix_mul": set(), "lomix_cat_awf": {"cat", "awf"}}  # fmt: skip
    # nonfinite_loss="raise": both ranks stop at the same step, each with a message
    messages = [(tmp_path / f"raise_nonfinite_rank{r}.txt").read_text() for r in (0, 1)]
    assert messages[0].startswith("non-finite loss at step 0 (batch 0) on another rank")
    assert messages[1].startswith("non-finite loss at step 0 (batch 0) in maps ['P1', 'add(1,2)'")
