"""Both weight callbacks under Lightning's FSDP strategy (2 CPU processes, gloo): they read whole weight vectors."""

import csv
import math
import subprocess
import sys

import pytest
import torch
from _subprocess import TESTS, lomix_env, outputs

pytestmark = pytest.mark.slow


def test_weight_callbacks_under_fsdp(tmp_path):
    command = [sys.executable, str(TESTS / "_fsdp_script.py"), str(tmp_path)]
    with (tmp_path / "stdout.txt").open("w") as out, (tmp_path / "stderr.txt").open("w") as err:
        process = subprocess.Popen(command, cwd=tmp_path, env=lomix_env(), stdout=out, stderr=err)
    try:
        process.wait(timeout=240)
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail(f"timed out (a deadlock?): {outputs(tmp_path)[1][-3000:]}")
    assert process.returncode == 0, outputs(tmp_path)[1][-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    # the case this is about: outside forward rank 0 holds none of alpha, the other rank all 19 values
    assert ranks[0]["shapes"] == [(0,), (0,)] and ranks[1]["shapes"] == [(19,), (19,)]
    full = ranks[0]["full"]  # gathered after training
    torch.testing.assert_close(full, ranks[1]["full"], rtol=0, atol=0)
    assert not torch.allclose(full, torch.full_like(full, math.log(2.0)), rtol=0, atol=1e-5)  # the weights trained
    before_step = ranks[0]["before_step"]  # (4 steps, 19): the full weights before each optimizer step
    assert before_step.shape == (4, 19)
    torch.testing.assert_close(before_step, ranks[1]["before_step"], rtol=0, atol=0)
    # rank 0 (alpha sharded away) reads the full weights of the last forward, the epoch's last training step (before
    # its optimizer step: validation does not call the loss); rank 1 (alpha whole there) reads the live weights
    for rank, expected in zip(ranks, ([before_step[1], before_step[3]], [before_step[2], full])):
        history = rank["callbacks"]["WeightTrajectoryLogger"]["history"]
        assert list(history) == [0, 1]
        for epoch in (0, 1):
            assert list(history[epoch]["weights"])[:4] == ["P1", "P2", "P3", "add(1,2)"]
            torch.testing.assert_close(torch.tensor(list(history[epoch]["weights"].values())), expected[epoch])
        best = rank["callbacks"]["BestEpochWeightBarChart"]
        assert best["best_weights"] == history[best["best_epoch"]]["weights"]
    with (tmp_path / "weights" / "weights.csv").open() as handle:  # written by rank 0
        rows = list(csv.reader(handle))
    assert len(rows) == 3 and all(len(row) == 2 + 19 for row in rows)  # header + 2 epochs; epoch, step, 19 maps
    torch.testing.assert_close(torch.tensor([float(v) for v in rows[2][2:]]), before_step[3])
    assert (tmp_path / "weights" / "best_val_dice_max.png").is_file()
    assert (tmp_path / "weights" / "operator_sums.png").is_file()
