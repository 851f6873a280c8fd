import pytest
from _lomix_tiny import RecordingLogger, make_trainer, skip_drawing

from lomix_lightning import LoMixLoss, LoMixSegmentationModule
from lomix_lightning.callbacks import WeightTrajectoryLogger
from lomix_lightning.callbacks._alignment import alignment_metrics
from lomix_lightning.data import SyntheticShapesDataModule
from lomix_lightning.models import UNet


def test_alignment_metrics_match_a_plain_loop():
    loss = LoMixLoss(num_outputs=3, num_classes=2)
    alignment = [((7 * i) % 11) / 5.5 - 1 for i in range(loss.num_maps)]
    metrics = alignment_metrics(loss.map_names, loss.map_families, alignment, per_map=True)
    for family in ("original", "add", "mul", "cat", "awf"):
        members = [
            name.startswith(f"{family}(") or (family == "original" and name[0] == "P") for name in loss.map_names
        ]
        values = [a for a, member in zip(alignment, members) if member]
        assert metrics[f"lomix/alignment_family/{family}"] == pytest.approx(sum(values) / len(values))
    assert metrics["lomix/alignment/cat(2,3)"] == alignment[loss.map_names.index("cat(2,3)")]
    with pytest.raises(ValueError, match="alignments"):
        alignment_metrics(["P1"], ["original"], [0.1, 0.2], per_map=False)


def test_alignment_is_logged_after_every_probe(tmp_path, monkeypatch):
    skip_drawing(monkeypatch)
    module = LoMixSegmentationModule(UNet(in_channels=1, num_classes=3, base_channels=4, depth=2), 3,
                                     weighting="aligned", hd95=False)  # fmt: skip
    module.criterion.weighting.every = 2
    logger = RecordingLogger()
    callback = WeightTrajectoryLogger(plot_every_n_epochs=None)
    trainer = make_trainer(tmp_path, [callback], logger=logger, max_epochs=1, limit_train_batches=3)
    data = SyntheticShapesDataModule(num_classes=3, image_size=16, num_train=6, num_val=2, batch_size=2)
    trainer.fit(module, datamodule=data)
    calls = [(step, m) for step, m in logger.lomix_calls() if "lomix/alignment_family/original" in m]
    assert [step for step, _ in calls] == [1, 3]  # probes in batches 0 and 2, logged after their optimizer steps
    last = calls[-1][1]
    names = module.criterion.map_names
    assert [last[f"lomix/alignment/{n}"] for n in names] == module.criterion.weighting.alignment.tolist()
    assert int(module.criterion.weighting.probes) == 2
