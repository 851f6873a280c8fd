import numpy as np
import pytest
import torch

from lomix_lightning.metrics import evaluate_volume, per_class_metrics, predict_volume


def block_volume(depth=5, size=48, num_classes=4):
    """Label volume of large blocks and an image that encodes the label as intensity (label / (C - 1))."""
    label = torch.zeros(depth, size, size, dtype=torch.int64)
    label[:, 4:20, 4:20] = 1
    label[1:4, 24:44, 8:30] = 2
    label[:, 30:40, 34:44] = 3
    return label.float() / (num_classes - 1), label


def intensity_predictor(num_classes=4, calls=None):
    """Logits peaking at the class whose intensity is closest: the identity-like model."""
    levels = torch.arange(num_classes).float() / (num_classes - 1)

    def predict(x):
        if calls is not None:
            calls.append(tuple(x.shape))
        return -((x - levels.view(1, -1, 1, 1)) ** 2) * 100  # (b, 1, S, S) vs (1, C, 1, 1) -> (b, C, S, S)

    return predict


def test_same_size_recovers_labels_exactly_and_batches():
    image, label = block_volume()
    calls = []
    pred = predict_volume(intensity_predictor(calls=calls), image, img_size=48, batch_size=2)
    assert pred.dtype == torch.int64 and pred.shape == label.shape
    assert torch.equal(pred, label)
    assert calls == [(2, 1, 48, 48), (2, 1, 48, 48), (1, 1, 48, 48)]


def uniform_interior(label, radius=2):
    """Voxels whose (2r+1)^2 in-slice neighbourhood holds a single label."""
    x = label[:, None].float()
    k = 2 * radius + 1
    hi = torch.nn.functional.max_pool2d(x, k, stride=1, padding=radius)
    lo = -torch.nn.functional.max_pool2d(-x, k, stride=1, padding=radius)
    return (hi == lo)[:, 0]


@pytest.mark.parametrize("img_size", [96, 32, 40, 64])
def test_resized_prediction_recovers_labels(img_size):
    image, label = block_volume()
    pred = predict_volume(intensity_predictor(), image, img_size=img_size, batch_size=16)
    assert pred.shape == label.shape
    # away from boundaries the labels come back exactly; boundary voxels may move by the resampling
    interior = uniform_interior(label)
    assert torch.equal(pred[interior], label[interior])
    assert (pred == label).float().mean().item() > 0.93


def test_accepts_batched_volume_and_single_channel_logits():
    image, label = block_volume(num_classes=2)
    binary = (label > 0).long()
    image = binary.float()
    pred = predict_volume(lambda x: x - 0.5, image[None], img_size=48)  # (1, D, H, W) input, one logit channel
    assert pred.shape == binary.shape
    assert torch.equal(pred, binary)


def test_predictor_sees_resized_slices():
    image, _ = block_volume()
    seen = []
    predict_volume(intensity_predictor(calls=seen), image, img_size=32, batch_size=8)
    assert seen == [(5, 1, 32, 32)]


def test_evaluate_volume_matches_per_class_metrics():
    image, label = block_volume()
    out = evaluate_volume(intensity_predictor(), image, label, num_classes=4, img_size=48)
    np.testing.assert_allclose(out["dice"], [1.0, 1.0, 1.0])
    np.testing.assert_allclose(out["hd95"], [0.0, 0.0, 0.0])
    # an imperfect predictor: compare with per_class_metrics on the predicted volume
    out2 = evaluate_volume(intensity_predictor(), image, label[None], num_classes=4, img_size=40, rule="nan")
    pred = predict_volume(intensity_predictor(), image, img_size=40)
    ref = per_class_metrics(pred, label, 4, rule="nan")
    for key in ("dice", "hd95", "iou"):
        np.testing.assert_allclose(out2[key], ref[key])


def test_errors():
    image, _ = block_volume()
    with pytest.raises(ValueError, match="volume"):
        predict_volume(intensity_predictor(), image[0], img_size=48)
    with pytest.raises(ValueError, match="logits"):
        predict_volume(lambda x: x[:, :, :4, :4], image, img_size=48)
    with pytest.raises(ValueError, match="img_size"):
        predict_volume(intensity_predictor(), image, img_size=0)
