import csv
import warnings

import numpy as np
import pytest
import torch
from _lomix_tiny import (
    RecordingLogger,
    TinyDataModule,
    TinyLoMixModule,
    assert_png_not_blank,
    make_trainer,
    skip_drawing,
)
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lomix_lightning import LoMixLoss
from lomix_lightning.callbacks import BestEpochWeightBarChart, WeightTrajectoryLogger
from lomix_lightning.callbacks._plots import plot_family_weights, plot_operator_sums, plot_weight_heatmap, save_png
from lomix_lightning.callbacks._weights import family_sums, weight_metrics


def _read_csv(path):
    with path.open(newline="") as handle:
        return list(csv.reader(handle))


def _figure_files(families):
    return {"weights.csv", "operator_sums.png", "weights_heatmap.png"} | {f"family_{f}.png" for f in set(families)}


def test_weight_metrics_match_a_plain_loop():
    loss = LoMixLoss(num_outputs=3, num_classes=2)
    weights = torch.rand(loss.num_maps, generator=torch.Generator().manual_seed(1)).tolist()
    metrics = weight_metrics(loss.map_names, loss.map_families, weights, per_map=True)
    total = sum(weights)
    for family in ("original", "add", "mul", "cat", "awf"):
        expected = 0.0
        for name, weight in zip(loss.map_names, weights):
            if name.startswith(f"{family}(") or (family == "original" and name.startswith("P")):
                expected += weight
        assert metrics[f"lomix/operator/{family}"] == pytest.approx(expected)
        assert metrics[f"lomix/share/{family}"] == pytest.approx(expected / total)
    assert metrics["lomix/weight/mul(1,3)"] == weights[loss.map_names.index("mul(1,3)")]
    assert len([k for k in metrics if k.startswith("lomix/weight/")]) == loss.num_maps == 19
    # only the families present, in the paper's order
    assert list(family_sums([1.0, 2.0, 3.0], ["awf", "original", "awf"])) == ["original", "awf"]
    assert not any(k.startswith("lomix/weight/") for k in weight_metrics(["P1"], ["original"], [1.0], per_map=False))


def test_fit_records_each_epoch_logs_scalars_and_writes_files(tmp_path):
    module = TinyLoMixModule(operators=None)  # all four operators: 19 maps
    callback = WeightTrajectoryLogger(plot_every_n_epochs=None)
    logger = CSVLogger(tmp_path)
    make_trainer(tmp_path, [callback], logger=logger, max_epochs=3).fit(module, datamodule=TinyDataModule())

    names = module.criterion.map_names
    assert list(callback.history) == [0, 1, 2]
    assert [record["step"] for record in callback.history.values()] == [2, 4, 6]
    for epoch, record in callback.history.items():
        assert record["weights"] == pytest.approx(module.train_end_weights[epoch])
    first, last = callback.as_array()[1][[0, -1]]
    assert np.all(last < first)  # learned weights shrink (reference-implementation.md 1.6)

    folder = tmp_path / "lightning_logs" / "version_0" / "lomix_weights"
    assert {p.name for p in folder.iterdir()} == _figure_files(module.criterion.map_families)
    rows = _read_csv(folder / "weights.csv")
    assert rows[0] == ["epoch", "step", *names]
    assert [row[:2] for row in rows[1:]] == [["0", "2"], ["1", "4"], ["2", "6"]]
    assert [float(v) for v in rows[2][2:]] == pytest.approx([callback.history[1]["weights"][n] for n in names])
    for png in folder.glob("*.png"):
        assert_png_not_blank(png)

    # the CSVLogger got the scalars: per map, per family and shares that sum to one
    logged = _read_csv(tmp_path / "lightning_logs" / "version_0" / "metrics.csv")
    header, body = logged[0], [dict(zip(logged[0], row)) for row in logged[1:]]
    assert {f"lomix/weight/{n}" for n in names} <= set(header)
    epoch_rows = [row for row in body if row["lomix/share/add"]]
    assert [int(row["step"]) for row in epoch_rows] == [2, 4, 6]
    for row, record in zip(epoch_rows, callback.history.values()):
        assert float(row["lomix/weight/P3"]) == pytest.approx(record["weights"]["P3"])
        assert sum(float(row[f"lomix/share/{f}"]) for f in ("original", "add", "mul", "cat", "awf")) == pytest.approx(1)


def test_every_n_steps_finds_a_renamed_criterion_and_honours_per_map(tmp_path, monkeypatch):
    skip_drawing(monkeypatch)
    module = TinyLoMixModule(criterion_attr="loss_fn")
    callback = WeightTrajectoryLogger(every_n_steps=1, per_map=False, plot_every_n_epochs=None)
    logger = RecordingLogger()
    trainer = make_trainer(tmp_path, [callback], logger=logger, max_epochs=2, limit_train_batches=3)
    trainer.fit(module, datamodule=TinyDataModule(num_samples=12))
    # accumulate nothing: 3 optimizer steps per epoch, one log per step plus one per epoch end
    steps = [step for step, _ in logger.lomix_calls()]
    assert steps == [1, 2, 3, 3, 4, 5, 6, 6]
    assert all(not key.startswith("lomix/weight/") for _, m in logger.lomix_calls() for key in m)
    assert list(callback.history) == [0, 1]
    assert callback.history[1]["weights"] == pytest.approx(module.train_end_weights[1])


def test_every_n_steps_logs_once_per_optimizer_step_under_accumulation(tmp_path, monkeypatch):
    skip_drawing(monkeypatch)
    callback = WeightTrajectoryLogger(every_n_steps=1, plot_every_n_epochs=None)
    logger = RecordingLogger()
    trainer = make_trainer(
        tmp_path, [callback], logger=logger, max_epochs=1, limit_train_batches=4, accumulate_grad_batches=2
    )
    trainer.fit(TinyLoMixModule(), datamodule=TinyDataModule(num_samples=16))
    # the 4 batches end at global steps 0, 1, 1, 2; the second batch at step 1 logs nothing; then the epoch end
    assert [step for step, _ in logger.lomix_calls()] == [0, 1, 2, 2]


@pytest.mark.parametrize("saved_at", ["train_epoch_end", "validation_end"])
def test_resume_continues_history_without_gap_or_duplicate(tmp_path, monkeypatch, saved_at):
    skip_drawing(monkeypatch)
    # ModelCheckpoint saves either at train-epoch end or (save_on_train_epoch_end=False) when validation ends, which
    # comes before this callback's on_train_epoch_end: both checkpoints must hold epoch 1.
    checkpoint = ModelCheckpoint(
        dirpath=tmp_path / "ckpt",
        filename="{epoch}",
        save_top_k=-1,
        save_on_train_epoch_end=saved_at == "train_epoch_end",
    )
    first = WeightTrajectoryLogger(plot_every_n_epochs=None)
    make_trainer(tmp_path, [first, checkpoint], max_epochs=3, enable_checkpointing=True).fit(
        TinyLoMixModule(), datamodule=TinyDataModule()
    )
    assert list(first.history) == [0, 1, 2]

    resumed = WeightTrajectoryLogger(plot_every_n_epochs=None)
    module = TinyLoMixModule()
    make_trainer(tmp_path, [resumed], max_epochs=4).fit(
        module, datamodule=TinyDataModule(), ckpt_path=tmp_path / "ckpt" / "epoch=1.ckpt"
    )
    assert list(resumed.history) == [0, 1, 2, 3]
    assert [record["step"] for record in resumed.history.values()] == [2, 4, 6, 8]
    for epoch in (0, 1):
        assert resumed.history[epoch] == first.history[epoch]
    # after a validation-end checkpoint Lightning finishes epoch 1 again: it is recorded again, replaced, not duplicated
    assert sorted(module.train_end_weights) == ([1, 2, 3] if saved_at == "validation_end" else [2, 3])
    assert resumed.history[2]["weights"] == pytest.approx(module.train_end_weights[2])
    assert resumed.history[3]["weights"] == pytest.approx(module.train_end_weights[3])
    rows = _read_csv(tmp_path / "lomix_weights" / "weights.csv")
    assert [row[0] for row in rows[1:]] == ["0", "1", "2", "3"]


def test_recording_an_epoch_again_replaces_it():
    callback = WeightTrajectoryLogger()
    callback._criterion = loss = LoMixLoss(num_outputs=2, num_classes=2)
    callback.record(1, 10)
    callback.record(0, 5)
    with torch.no_grad():
        loss.weighting.alpha.fill_(-1.0)
    callback.record(1, 12)
    assert list(callback.history) == [0, 1]
    assert callback.history[1]["step"] == 12
    assert callback.history[1]["weights"]["P1"] == pytest.approx(np.log1p(np.exp(-1.0)))
    assert callback.history[0]["weights"]["P1"] == pytest.approx(np.log(2.0))

    restored = WeightTrajectoryLogger()
    restored.load_state_dict(callback.state_dict())
    assert restored.history == callback.history
    other = WeightTrajectoryLogger()
    other._criterion = LoMixLoss(num_outputs=3, num_classes=2)
    with pytest.raises(ValueError, match="resume with the same model"):
        other.load_state_dict(callback.state_dict())


def test_tensorboard_receives_figures_and_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    module = TinyLoMixModule(num_outputs=2, operators=("add",))
    callback = WeightTrajectoryLogger(plot_every_n_epochs=1)
    logger = TensorBoardLogger(tmp_path, name="tb")
    make_trainer(tmp_path, [callback], logger=logger, max_epochs=2).fit(module, datamodule=TinyDataModule())

    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    families = sorted(set(module.criterion.map_families))
    expected = {"lomix/figure/operator_sums", "lomix/figure/weights_heatmap"}
    expected |= {f"lomix/figure/family_{f}" for f in families}
    assert set(events.Tags()["images"]) == expected
    # drawn at each epoch end; the train-end pass does not redraw the same history
    assert [event.step for event in events.Images("lomix/figure/weights_heatmap")] == [2, 4]
    assert [event.step for event in events.Scalars("lomix/share/add")] == [2, 4]
    share = sum(events.Scalars(f"lomix/share/{f}")[-1].value for f in families)
    assert share == pytest.approx(1.0, abs=1e-5)
    assert (tmp_path / "tb" / "version_0" / "lomix_weights" / "weights_heatmap.png").is_file()


def test_no_logger_writes_to_default_root_dir_and_dirpath_overrides(tmp_path):
    module = TinyLoMixModule(num_outputs=2, operators=("add",))
    make_trainer(tmp_path, [WeightTrajectoryLogger()], max_epochs=1).fit(module, datamodule=TinyDataModule())
    assert {p.name for p in (tmp_path / "lomix_weights").iterdir()} == _figure_files(module.criterion.map_families)

    target = tmp_path / "elsewhere"
    make_trainer(tmp_path / "run2", [WeightTrajectoryLogger(dirpath=target)], max_epochs=1).fit(
        TinyLoMixModule(num_outputs=2, operators=("add",)), datamodule=TinyDataModule()
    )
    assert (target / "weights.csv").is_file() and not (tmp_path / "run2" / "lomix_weights").exists()


def test_fixed_scheme_warns_once_and_writes_nothing(tmp_path):
    callbacks = [WeightTrajectoryLogger(every_n_steps=1), BestEpochWeightBarChart(log_every_best=True)]
    logger = RecordingLogger()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):  # a second fit with the same callbacks stays quiet too
            trainer = make_trainer(tmp_path, callbacks, logger=logger, max_epochs=2)
            trainer.fit(TinyLoMixModule(scheme="deep_supervision", operators=None), datamodule=TinyDataModule())
    messages = [str(w.message) for w in caught]
    for name in ("WeightTrajectoryLogger", "BestEpochWeightBarChart"):
        assert sum(m.startswith(f"{name}: the LoMix loss uses fixed weights") for m in messages) == 1, messages
    assert logger.calls and not logger.lomix_calls()
    assert not (tmp_path / "lomix_weights").exists()
    assert callbacks[0].history == {} and callbacks[1].best_weights == {}


def test_module_without_lomix_loss_raises(tmp_path):
    from _lomix_tiny import PlainModule

    trainer = make_trainer(tmp_path, [WeightTrajectoryLogger()], max_epochs=1)
    with pytest.raises(MisconfigurationException, match=r"PlainModule holds no lomix_lightning.LoMixLoss"):
        trainer.fit(PlainModule(), datamodule=TinyDataModule())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"every_n_steps": 0}, "every_n_steps must be None or an integer >= 1, got 0"),
        ({"every_n_steps": 2.5}, "every_n_steps"),
        ({"plot_every_n_epochs": -1}, "plot_every_n_epochs must be None or an integer >= 1, got -1"),
        ({"plot_every_n_epochs": True}, "plot_every_n_epochs"),
        ({"per_map": "yes"}, "per_map must be a bool, got 'yes'"),
    ],
)
def test_bad_arguments_raise(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        WeightTrajectoryLogger(**kwargs)


def test_figures_of_a_long_history_are_labelled(tmp_path):
    loss = LoMixLoss(num_outputs=4, num_classes=2)
    names, families = loss.map_names, loss.map_families
    rates = np.linspace(0.02, 0.2, loss.num_maps)
    epochs = list(range(30))
    history = np.log(2.0) * np.exp(-np.outer(epochs, rates))  # (E, M) decaying weights

    heatmap = plot_weight_heatmap(epochs, history, names, families)
    assert [label.get_text() for label in heatmap.axes[0].get_yticklabels()] == names  # all 48 maps readable
    assert [ax.get_title() for ax in heatmap.axes[:3]] == [
        "(a) weight, linear colour scale",
        "(b) weight, log colour scale",
        "(c) share of the epoch's total",
    ]
    np.testing.assert_allclose(heatmap.axes[0].collections[0].get_array().reshape(48, 30), history.T)
    share = heatmap.axes[2].collections[0].get_array().reshape(48, 30)  # (M, E), each epoch sums to 100%
    np.testing.assert_allclose(share.sum(axis=0), 100.0)
    np.testing.assert_allclose(share[:, 7], 100.0 * history[7] / history[7].sum())
    assert "48 maps" in heatmap.get_suptitle()

    sums = plot_operator_sums(epochs, history, families)
    assert [ax.get_xlabel() for ax in sums.axes[:3]] == ["epoch"] * 3
    assert sums.axes[1].get_yscale() == "log"
    assert [t.get_text() for t in sums.legends[0].get_texts()] == [
        "Original (4)",
        "Add (11)",
        "Mul (11)",
        "Concat (11)",
        "AWF (11)",
    ]
    # the first panel plots the family sums
    np.testing.assert_allclose(sums.axes[0].lines[4].get_ydata(), history[:, 37:].sum(axis=1))

    panel = plot_family_weights(epochs, history, names, families, "mul")
    assert [t.get_text() for t in panel.legends[0].get_texts()] == [n for n in names if n.startswith("mul(")]
    assert [ax.get_yscale() for ax in panel.axes] == ["linear", "log"]
    with pytest.raises(ValueError, match="no map of family 'sub'"):
        plot_family_weights(epochs, history, names, families, "sub")

    save_png(heatmap, tmp_path / "heatmap.png")  # the other figures' PNGs are checked after the fits above
    assert_png_not_blank(tmp_path / "heatmap.png")
