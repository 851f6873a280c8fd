import csv
import json
import math
import warnings

import pytest
from _lomix_tiny import (
    RecordingLogger,
    TinyDataModule,
    TinyLoMixModule,
    assert_png_not_blank,
    make_trainer,
    skip_drawing,
)
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

from lomix_lightning.callbacks import BestEpochWeightBarChart, WeightTrajectoryLogger

NAN = math.nan


def _read_csv(path):
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.parametrize(
    ("mode", "scores", "best_epoch"),
    [
        ("max", (0.2, 0.7, 0.5, 0.6), 1),
        ("max", (0.9, 0.1, 0.2, 0.3), 0),  # the sanity check (also 0.9, at step 0) must not count
        ("min", (0.4, 0.3, 0.35, 0.1), 3),
        ("max", (NAN, 0.3, NAN, 0.3), 1),  # NaN never wins; a tie keeps the earlier epoch
    ],
)
def test_best_epoch_snapshot_equals_the_modules_weights_then(tmp_path, monkeypatch, mode, scores, best_epoch):
    skip_drawing(monkeypatch)
    module = TinyLoMixModule(val_scores=scores)
    callback = BestEpochWeightBarChart(monitor="val/dice", mode=mode)
    make_trainer(tmp_path, [callback], max_epochs=4).fit(module, datamodule=TinyDataModule())

    assert callback.best_epoch == best_epoch
    assert callback.best_score == pytest.approx(scores[best_epoch])
    assert callback.best_step == 2 * (best_epoch + 1)
    assert callback.best_weights == pytest.approx(module.val_end_weights[best_epoch])
    other = 3 if best_epoch != 3 else 0  # the weights move, so the snapshot is not just any epoch's
    assert callback.best_weights != pytest.approx(module.val_end_weights[other], rel=1e-4)


def test_outputs_png_csv_and_rich_table(tmp_path, capsys):
    module = TinyLoMixModule(num_outputs=4, operators=None, val_scores=(0.1, 0.9, 0.2))
    callback = BestEpochWeightBarChart(top_k=5)
    make_trainer(tmp_path, [callback], max_epochs=3).fit(module, datamodule=TinyDataModule())

    folder = tmp_path / "lomix_weights"
    assert_png_not_blank(folder / "best_val_dice_max.png")
    rows = _read_csv(folder / "best_val_dice_max.csv")
    assert len(rows) == module.criterion.num_maps == 48  # every map, not only the top_k drawn
    weights = [float(row["weight"]) for row in rows]
    assert weights == sorted(weights, reverse=True)
    assert [int(row["rank"]) for row in rows] == list(range(1, 49))
    assert {row["map"]: float(row["weight"]) for row in rows} == pytest.approx(module.val_end_weights[1])
    assert sum(float(row["share"]) for row in rows) == pytest.approx(1.0)
    family = dict(zip(module.criterion.map_names, module.criterion.map_families))
    assert all(row["family"] == family[row["map"]] for row in rows)
    assert {row["epoch"] for row in rows} == {"1"} and {row["step"] for row in rows} == {"4"}

    out = capsys.readouterr().out
    assert "Best-epoch LoMix weights" in out and "val/dice = 0.9 (max)" in out
    table_rows = [line for line in out.splitlines() if "%" in line]
    assert len(table_rows) == 5
    assert rows[0]["map"] in table_rows[0] and rows[4]["map"] in table_rows[4]


def test_log_every_best_sends_a_chart_per_new_best_to_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path, name="tb")
    callback = BestEpochWeightBarChart(log_every_best=True, top_k=3)
    module = TinyLoMixModule(num_outputs=2, val_scores=(0.2, 0.7, 0.5, 0.9))
    make_trainer(tmp_path, [callback], logger=logger, max_epochs=4).fit(module, datamodule=TinyDataModule())

    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0})
    events.Reload()
    # new bests at epochs 0, 1 and 3 (steps 2, 4, 8); the chart at training end is not drawn twice
    assert [event.step for event in events.Images("lomix/best/figure")] == [2, 4, 8]
    assert (tmp_path / "tb" / "version_0" / "lomix_weights" / "best_val_dice_max.png").is_file()


def test_two_instances_coexist_and_resume_from_a_checkpoint(tmp_path, monkeypatch):
    skip_drawing(monkeypatch)
    scores = (0.2, 0.9, 0.5, 0.1)
    best_max, best_min = BestEpochWeightBarChart(mode="max"), BestEpochWeightBarChart(mode="min")
    assert best_max.state_key != best_min.state_key
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0)
    first = TinyLoMixModule(num_outputs=2, val_scores=scores)
    trainer = make_trainer(tmp_path, [best_max, best_min, checkpoint], max_epochs=2, enable_checkpointing=True)
    trainer.fit(first, datamodule=TinyDataModule())
    assert (best_max.best_epoch, best_min.best_epoch) == (1, 0)

    resumed_max, resumed_min = BestEpochWeightBarChart(mode="max"), BestEpochWeightBarChart(mode="min")
    module = TinyLoMixModule(num_outputs=2, val_scores=scores)
    make_trainer(tmp_path, [resumed_min, resumed_max], max_epochs=4).fit(
        module, datamodule=TinyDataModule(), ckpt_path=tmp_path / "ckpt" / "last.ckpt"
    )
    assert resumed_max.best_epoch == 1 and resumed_max.best_score == pytest.approx(0.9)
    assert resumed_max.best_weights == best_max.best_weights  # restored, not recomputed
    assert resumed_min.best_epoch == 3 and resumed_min.best_score == pytest.approx(0.1)
    assert resumed_min.best_weights == pytest.approx(module.val_end_weights[3])
    assert sorted(module.val_end_weights) == [2, 3]


def test_missing_monitor_warns_once_and_charts_nothing(tmp_path):
    callback = BestEpochWeightBarChart(monitor="val/missing")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(tmp_path, [callback], max_epochs=3).fit(TinyLoMixModule(), datamodule=TinyDataModule())
    messages = [str(w.message) for w in caught if "could not find monitor='val/missing'" in str(w.message)]
    assert len(messages) == 1 and "'val/dice'" in messages[0]
    assert callback.best_epoch is None and not (tmp_path / "lomix_weights").exists()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mode": "maximum"}, "mode must be one of ('min', 'max'), got 'maximum'"),
        ({"monitor": ""}, "monitor must be a non-empty metric name, got ''"),
        ({"top_k": 0}, "top_k must be None or an integer >= 1, got 0"),
        ({"log_every_best": 1}, "log_every_best must be a bool, got 1"),
    ],
)
def test_bad_arguments_raise(kwargs, message):
    with pytest.raises(ValueError) as error:
        BestEpochWeightBarChart(**kwargs)
    assert str(error.value) == message


def test_wandb_offline_run_gets_tables_charts_and_images(tmp_path, monkeypatch):
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")  # WandbLogger rewrites it; monkeypatch restores it
    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = WandbLogger(save_dir=tmp_path, offline=True, project="lomix-callback-test")
    scalars = RecordingLogger()
    callbacks = [WeightTrajectoryLogger(plot_every_n_epochs=1), BestEpochWeightBarChart(top_k=2)]
    module = TinyLoMixModule(num_outputs=2, operators=("add", "awf"), val_scores=(0.1, 0.5))
    try:
        make_trainer(tmp_path, callbacks, logger=[logger, scalars], max_epochs=2).fit(
            module, datamodule=TinyDataModule()
        )
    finally:
        wandb.finish()

    (run,) = (tmp_path / "wandb").glob("offline-run-*")
    media = run / "files" / "media"
    bar = json.loads(next((media / "table" / "lomix" / "best").glob("bar_chart_table_*.table.json")).read_text())
    assert bar["columns"] == ["map", "family", "weight", "share"]
    top = [name for name, *_ in callbacks[1].ranked()[:2]]  # the chart shows the top_k
    assert [row[0] for row in bar["data"]] == top
    assert [row[2] for row in bar["data"]] == pytest.approx([callbacks[1].best_weights[name] for name in top])
    table = json.loads(next((media / "table" / "lomix" / "best").glob("table_*.table.json")).read_text())
    assert table["columns"] == bar["columns"] and len(table["data"]) == module.criterion.num_maps == 4  # all maps
    assert sum(row[3] for row in table["data"]) == pytest.approx(1.0)
    sums = sorted((media / "table" / "lomix" / "chart").glob("operator_sums_table_*.table.json"))
    shares = sorted((media / "table" / "lomix" / "chart").glob("operator_shares_table_*.table.json"))
    assert len(sums) == len(shares) == 2  # re-logged at each of the 2 epoch ends
    last = json.loads(sums[-1].read_text())
    assert last["columns"] == ["step", "lineKey", "lineVal"]
    assert {row[1] for row in last["data"]} == {"Original", "Add", "AWF"}
    assert len(last["data"]) == 3 * 2  # 3 families x 2 epochs
    images = {p.name.rsplit("_", 2)[0] for p in (media / "images" / "lomix").rglob("*.png")}
    assert {"operator_sums", "weights_heatmap", "family_add", "figure"} <= images
    # the scalars went through logger.log_metrics, so a second logger got the same ones
    assert any("lomix/share/awf" in metrics for _, metrics in scalars.calls)


CLI_YAML = """
trainer:
  logger: false
  callbacks:
    - class_path: lomix_lightning.callbacks.WeightTrajectoryLogger
      init_args:
        every_n_steps: 50
        plot_every_n_epochs: 10
    - class_path: lomix_lightning.callbacks.BestEpochWeightBarChart
      init_args:
        monitor: val/dice
        mode: {mode}
        top_k: 15
"""


def test_both_callbacks_parse_from_a_lightningcli_config(tmp_path):
    from lightning.pytorch.cli import LightningCLI

    config = tmp_path / "config.yaml"
    config.write_text(CLI_YAML.format(mode="max"))
    cli = LightningCLI(TinyLoMixModule, TinyDataModule, run=False, args=["--config", str(config)])
    ours = [c for c in cli.trainer.callbacks if isinstance(c, (WeightTrajectoryLogger, BestEpochWeightBarChart))]
    assert [type(c).__name__ for c in ours] == ["WeightTrajectoryLogger", "BestEpochWeightBarChart"]
    assert (ours[0].every_n_steps, ours[1].top_k, ours[1].mode) == (50, 15, "max")

    config.write_text(CLI_YAML.format(mode="maximum"))  # Literal["min", "max"] is checked when the YAML is parsed
    with pytest.raises(SystemExit):
        LightningCLI(TinyLoMixModule, TinyDataModule, run=False, args=["--config", str(config)])
