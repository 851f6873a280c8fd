"""Whole-volume testing: sliding-window options, the blended prediction, and the module's 3-D test loop."""

import lightning.pytorch as pl
import numpy as np
import pytest
import torch

from lomix_lightning import LoMixSegmentationModule
from lomix_lightning.data import SyntheticVolumesDataModule
from lomix_lightning.errors import LomixUserError
from lomix_lightning.metrics.per_class import per_class_metrics
from lomix_lightning.sliding_window import batch_spacings, check_sliding_window, sliding_window_logits

pytest.importorskip("monai")


def test_options_defaults_and_errors():
    assert check_sliding_window(None) is None
    assert check_sliding_window({"roi_size": [8, 16, 16], "mode": "constant"}) == {
        "roi_size": [8, 16, 16],
        "overlap": 0.25,
        "mode": "constant",
        "sw_batch_size": 1,
    }
    bad = [
        ({"overlap": 0.5}, "roi_size must be"),
        ({"roi_size": 0}, "roi_size must be"),
        ({"roi_size": 8, "overlap": -0.1}, "overlap must be in"),
        ({"roi_size": 8, "mode": "max"}, "mode must be"),
        ({"roi_size": 8, "sw_batch_size": 0}, "sw_batch_size must be"),
        ({"roi_size": 8, "stride": 4}, "unknown keys"),
    ]
    for options, message in bad:
        with pytest.raises(LomixUserError, match=message):
            check_sliding_window(options)


@pytest.mark.parametrize("mode", ["constant", "gaussian"])
@pytest.mark.parametrize("shape", [(1, 2, 20, 13), (2, 1, 11, 20, 17)])
def test_blending_a_pointwise_predictor_is_exact(mode, shape):
    """Every window of ``z -> 3z - 1`` agrees, so any blend of them must give ``3x - 1`` everywhere."""
    x = torch.randn(*shape)
    options = check_sliding_window({"roi_size": 8, "overlap": 0.5, "mode": mode, "sw_batch_size": 3})
    torch.testing.assert_close(sliding_window_logits(lambda w: 3 * w - 1, x, options), 3 * x - 1)
    with pytest.raises(LomixUserError, match="has 3 sizes but the input has 2"):
        sliding_window_logits(lambda w: w, torch.zeros(1, 1, 8, 8), check_sliding_window({"roi_size": [8, 8, 8]}))


def test_batch_spacings():
    assert batch_spacings({"spacing": torch.tensor([2.0, 1.0, 0.5])}, 2) == [[2.0, 1.0, 0.5]] * 2
    assert batch_spacings({"image": torch.zeros(1)}, 1) == [None]


def test_module_tests_whole_volumes_by_windows_with_spacing():
    """The 3-D test loop: 24^3 volumes through a 16^3 window; per-case scores equal scoring that prediction directly
    with the data's spacing; a window covering the volume equals the plain forward."""
    from lomix_lightning.models import MonaiDynUNet

    torch.manual_seed(0)
    spacing = (2.0, 1.0, 0.5)
    data = SyntheticVolumesDataModule(volume_size=16, test_volume_size=24, num_train=2, num_test=2, spacing=spacing)
    net = MonaiDynUNet(1, 4, strides=(1, 2, 2), filters=(4, 8, 8), deep_supr_num=1)
    window = {"roi_size": 16, "overlap": 0.5, "mode": "gaussian"}
    module = LoMixSegmentationModule(net, 4, sliding_window=window, hd95_empty_rule="nan")
    trainer = pl.Trainer(
        logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False
    )
    trainer.test(module, datamodule=data)
    assert module.test_case_results["hd95"].shape == (2, 3)
    module.eval()
    for case, batch in enumerate(data.test_dataloader()):
        with torch.no_grad():
            logits = sliding_window_logits(module, batch["image"], check_sliding_window(window))
        assert logits.shape == (1, 4, 24, 24, 24)
        expected = per_class_metrics(logits.argmax(1)[0].numpy(), batch["mask"][0].numpy(), 4, spacing, rule="nan")
        for key in ("dice", "hd95", "iou"):
            np.testing.assert_allclose(module.test_case_results[key][case], expected[key], rtol=1e-5, equal_nan=True)
        whole = LoMixSegmentationModule(net, 4, sliding_window={"roi_size": 24}).eval()
        with torch.no_grad():
            torch.testing.assert_close(whole.evaluator.whole_logits(whole, batch["image"]), module(batch["image"]))
