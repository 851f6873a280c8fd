"""Each run gets its own weight folder, whatever the logger (issue #13 item 6: W&B runs used to share one)."""

import csv
from pathlib import Path

import lightning.pytorch as pl
import torch
import wandb
from _subprocess import FAST
from lightning.pytorch.loggers import CSVLogger, WandbLogger

from lomix_lightning.callbacks._loggers import run_dir
from lomix_lightning.callbacks._weights import output_dir
from lomix_lightning.cli import main

CONFIGS = Path(__file__).parents[2] / "configs"


def _trainer(logger, tmp_path):
    return pl.Trainer(logger=logger, default_root_dir=tmp_path, enable_progress_bar=False, enable_checkpointing=False)


def test_run_dir_per_logger(tmp_path):
    wandb = WandbLogger(project="lomix", save_dir=str(tmp_path / "runs"), id="abc123", offline=True)
    assert run_dir(_trainer(wandb, tmp_path)) == tmp_path / "runs" / "lomix" / "abc123"  # no wandb.init needed
    csv_logger = CSVLogger(tmp_path / "runs", name="demo", version=2)
    assert run_dir(_trainer(csv_logger, tmp_path)) == tmp_path / "runs" / "demo" / "version_2"
    assert run_dir(_trainer(False, tmp_path)) == tmp_path
    assert output_dir(_trainer(wandb, tmp_path), None) == tmp_path / "runs" / "lomix" / "abc123" / "lomix_weights"
    assert output_dir(_trainer(wandb, tmp_path), tmp_path / "mine") == tmp_path / "mine"


def test_two_wandb_runs_keep_their_own_weights(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for epochs in (1, 2):
            argv = ["fit", "--config", str(CONFIGS / "wandb.yaml"), *FAST, f"--trainer.max_epochs={epochs}"]
            assert main(argv) == 0
            wandb.finish()  # one process is one run; in-process, WandbLogger would reuse the active run
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    folders = sorted((tmp_path / "lomix_runs" / "lomix").glob("*/lomix_weights"))
    assert len(folders) == 2, folders  # <save_dir>/<project>/<run id>/lomix_weights, one per run
    epochs = sorted(len(list(csv.DictReader((f / "weights.csv").open()))) for f in folders)
    assert epochs == [1, 2]  # the second run did not overwrite the first one's history
    for folder in folders:
        assert f"LoMix weight plots and CSV: {folder.relative_to(tmp_path)}" in out
        assert (folder.parent / "checkpoints" / "last.ckpt").is_file()  # next to Lightning's checkpoints of the run
    assert not (tmp_path / "lomix_runs" / "lomix_weights").exists()
