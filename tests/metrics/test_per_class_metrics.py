import io
import math

import numpy as np
import pytest
import torch
from rich.console import Console
from scipy.spatial.distance import cdist

from lomix_lightning.metrics import (
    binary_case_metrics,
    metrics_table,
    per_class_metrics,
    print_metrics_table,
)
from lomix_lightning.metrics.scores import CaseScores


def brute_hd95(a, b, spacing):
    """Independent HD95 with 6-neighbour surfaces via explicit neighbour checks and cdist."""

    def surface(m):
        p = np.pad(m, 1)
        inner = np.ones_like(m)
        for axis in range(m.ndim):
            for shift in (-1, 1):
                inner &= np.roll(p, shift, axis=axis)[tuple(slice(1, -1) for _ in range(m.ndim))]
        return m & ~inner

    pa = np.argwhere(surface(a)) * np.asarray(spacing)
    pb = np.argwhere(surface(b)) * np.asarray(spacing)
    d = cdist(pa, pb)
    return np.percentile(np.hstack((d.min(1), d.min(0))), 95)


def make_case():
    """A (4, 10, 10) volume with classes 1, 2, 3 in gt and a prediction that errs on each in a known way."""
    gt = np.zeros((4, 10, 10), np.int64)
    gt[:, 1:5, 1:5] = 1  # 64 voxels
    gt[1:3, 6:9, 6:9] = 2  # 18 voxels
    gt[0, 8, 1] = 3  # 1 voxel; predicted as nothing
    pred = np.zeros_like(gt)
    pred[:, 1:5, 2:6] = 1  # shifted right by one column: overlap 4*4*3 = 48
    pred[1:3, 6:9, 6:9] = 2  # exact
    pred[3, 0, 9] = 4  # class 4: false positive on an absent class
    return pred, gt


def test_hand_made_volume_transunet_rule():
    pred, gt = make_case()
    m = per_class_metrics(pred, gt, num_classes=5, spacing=(2.0, 1.0, 1.0))
    # class 1: dice 2*48/(64+64) = 0.75, iou 48/80 = 0.6, hd95 from brute force with the same spacing
    assert m["dice"][0] == pytest.approx(0.75)
    assert m["iou"][0] == pytest.approx(0.6)
    assert m["hd95"][0] == pytest.approx(brute_hd95(pred == 1, gt == 1, (2.0, 1.0, 1.0)))
    # class 2: exact
    assert (m["dice"][1], m["hd95"][1], m["iou"][1]) == (1.0, 0.0, 1.0)
    # class 3: missed (pred empty) -> (0, 0, 0)
    assert (m["dice"][2], m["hd95"][2], m["iou"][2]) == (0.0, 0.0, 0.0)
    # class 4: pred non-empty, gt empty -> (1, 0, 1)
    assert (m["dice"][3], m["hd95"][3], m["iou"][3]) == (1.0, 0.0, 1.0)
    assert set(m) == {"dice", "hd95", "iou"}
    assert all(v.shape == (4,) and v.dtype == np.float64 for v in m.values())


def test_hand_made_volume_nan_rule():
    pred, gt = make_case()
    m = per_class_metrics(pred, gt, num_classes=6, rule="nan")
    assert m["dice"][0] == pytest.approx(0.75)
    assert m["hd95"][0] == pytest.approx(brute_hd95(pred == 1, gt == 1, (1, 1, 1)))
    assert m["dice"][2] == 0.0 and math.isnan(m["hd95"][2]) and m["iou"][2] == 0.0  # missed
    assert m["dice"][3] == 0.0 and math.isnan(m["hd95"][3]) and m["iou"][3] == 0.0  # false positive
    assert all(math.isnan(m[k][4]) for k in ("dice", "hd95", "iou"))  # class 5 absent from both


def test_hd95_spacing_changes_only_hd95():
    pred, gt = make_case()
    a = per_class_metrics(pred, gt, 5)
    b = per_class_metrics(pred, gt, 5, spacing=(3.0, 0.5, 0.5))
    np.testing.assert_array_equal(a["dice"], b["dice"])
    assert a["hd95"][0] != b["hd95"][0]


def test_empty_rules_binary():
    full = np.ones((3, 3), bool)
    empty = np.zeros((3, 3), bool)
    assert binary_case_metrics(full, empty) == (1.0, 0.0, 1.0)
    assert binary_case_metrics(empty, full) == (0.0, 0.0, 0.0)
    assert binary_case_metrics(empty, empty) == (0.0, 0.0, 0.0)
    d, h, i = binary_case_metrics(empty, empty, rule="nan")
    assert math.isnan(d) and math.isnan(h) and math.isnan(i)
    with pytest.raises(ValueError, match="rule"):
        binary_case_metrics(full, full, rule="zero")


def test_background_and_torch_input():
    pred, gt = make_case()
    m = per_class_metrics(torch.from_numpy(pred), torch.from_numpy(gt), 5, include_background=True)
    assert m["dice"].shape == (5,)
    bg_p, bg_g = pred == 0, gt == 0
    assert m["dice"][0] == pytest.approx(2 * (bg_p & bg_g).sum() / (bg_p.sum() + bg_g.sum()))
    np.testing.assert_array_equal(m["dice"][1:], per_class_metrics(pred, gt, 5)["dice"])


def test_per_class_errors():
    with pytest.raises(ValueError, match="same shape"):
        per_class_metrics(np.zeros((2, 2)), np.zeros((2, 3)), 3)
    with pytest.raises(ValueError, match="num_classes"):
        per_class_metrics(np.zeros((2, 2)), np.zeros((2, 2)), 1)


def test_case_scores_mean_over_cases_per_class():
    c1 = {"dice": np.array([1.0, 0.2]), "hd95": np.array([0.0, 10.0]), "iou": np.array([1.0, 0.1])}
    c2 = {"dice": np.array([0.5, np.nan]), "hd95": np.array([4.0, np.nan]), "iou": np.array([0.4, np.nan])}
    c3 = {"dice": np.array([0.0, 0.4]), "hd95": np.array([2.0, 20.0]), "iou": np.array([0.0, 0.3])}
    scores = CaseScores(num_scored=2)
    for case in (c1, c2, c3):
        scores.update(case)
    out = scores.compute()
    np.testing.assert_allclose(out["dice"], [0.5, 0.3])
    np.testing.assert_allclose(out["hd95"], [2.0, 15.0])
    np.testing.assert_allclose(out["iou"], [1.4 / 3, 0.2])
    assert int(out["cases"]) == 3


def test_table_rows_and_mean():
    summary = {"dice": np.array([0.9, 0.5]), "hd95": np.array([2.0, 4.0]), "iou": np.array([0.8, 0.4])}
    table = metrics_table(summary, ["liver", "pancreas"], title="Synapse")
    assert table.row_count == 3
    cells = [list(col.cells) for col in table.columns]
    assert cells[0] == ["liver", "pancreas", "Mean"]
    assert cells[1] == ["90.00", "50.00", "70.00"]
    assert cells[2] == ["2.00", "4.00", "3.00"]
    with pytest.raises(ValueError, match="class names"):
        metrics_table(summary, ["liver"])
    console = Console(file=io.StringIO(), width=80)
    print_metrics_table(summary, ["liver", "pancreas"], console=console)
    text = console.file.getvalue()
    assert "pancreas" in text and "70.00" in text


@pytest.mark.parametrize("seed", range(4))
def test_cropping_per_class_changes_nothing(seed):
    # per_class_metrics crops each class to its bounding box; compare with the full-array binary computation
    rng = np.random.default_rng(seed)
    gt = rng.integers(0, 4, size=(6, 12, 12)) * (rng.random((6, 12, 12)) < 0.3)
    pred = np.where(rng.random((6, 12, 12)) < 0.2, rng.integers(0, 4, size=(6, 12, 12)), gt)
    gt[:, 0, :] = 3  # touches the array border
    for rule in ("transunet", "nan"):
        m = per_class_metrics(pred, gt, 5, spacing=(2.0, 1.0, 0.5), rule=rule)
        for i, c in enumerate(range(1, 5)):
            expected = binary_case_metrics(pred == c, gt == c, (2.0, 1.0, 0.5), rule)
            np.testing.assert_allclose([m["dice"][i], m["hd95"][i], m["iou"][i]], expected)


def test_label_dtypes():
    pred, gt = make_case()
    ref = per_class_metrics(pred, gt, 5)
    got = per_class_metrics(pred.astype(np.float32), gt.astype(np.uint8), 5)
    for key in ref:
        np.testing.assert_array_equal(ref[key], got[key])
    with pytest.raises(ValueError, match="integer class ids"):
        per_class_metrics(pred + 0.5, gt, 5)
