import pytest
import timm
import torch
import torch.nn.functional as F
from _networks import checked_prediction_network, fit_losses, num_params

from lomix_lightning.models import TimmUNet


@pytest.mark.parametrize(
    ("encoder_name", "expected_sizes"),
    [
        ("test_resnet", [4, 8, 16, 32]),  # reductions 2..32: stages at 1/16 .. 1/2
        ("test_efficientnet", [4, 8, 16, 32]),
        ("test_convnext", [4, 8, 16]),  # reductions 4..32: stages at 1/16 .. 1/4
    ],
)
def test_outputs_follow_the_encoder_reductions(encoder_name, expected_sizes):
    net = TimmUNet(encoder_name, num_classes=3, in_channels=1)
    outputs = net(torch.randn(2, 1, 64, 64))
    assert net.num_outputs == len(outputs) == len(expected_sizes)
    assert [p.shape[-1] for p in outputs] == expected_sizes
    assert [64 // r for r in net.reductions] == expected_sizes
    assert all(p.shape[:2] == (2, 3) for p in outputs)


def test_channels_come_from_feature_info():
    net = TimmUNet("test_resnet", num_classes=2, in_channels=3)
    channels = timm.create_model("test_resnet", features_only=True).feature_info.channels()  # finest first
    assert [head.in_channels for head in net.heads] == channels[-2::-1]


def test_num_outputs_keeps_the_finest_stages():
    net = TimmUNet("test_resnet", num_classes=2, in_channels=1, decoder_channels=(32, 16, 8, 4), num_outputs=2)
    outputs = net(torch.randn(1, 1, 64, 64))
    assert [p.shape[-1] for p in outputs] == [16, 32]
    assert [head.in_channels for head in net.heads] == [8, 4]


def test_gradients_reach_every_head():
    net = TimmUNet("test_efficientnet", num_classes=2, in_channels=1, decoder_channels=(16, 8, 8, 4))
    sum(p.square().mean() for p in net(torch.randn(2, 1, 32, 32))).backward()
    for head in net.heads:
        assert head.weight.grad is not None
        assert head.weight.grad.abs().sum() > 0


def test_train_eval_final_and_prediction_network():
    net = TimmUNet("test_resnet", num_classes=2, in_channels=1, decoder_channels=(16, 8, 8, 4))
    x = torch.randn(2, 1, 32, 32)
    assert type(net.train()(x)) is list
    pred = checked_prediction_network(net, x)
    assert num_params(pred) == num_params(net) - num_params(net.auxiliary_heads())
    assert num_params(net.auxiliary_heads()) == (16 * 2 + 2) + (8 * 2 + 2) + (8 * 2 + 2)
    assert {p.data_ptr() for p in pred.parameters()} <= {p.data_ptr() for p in net.parameters()}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"encoder_name": "not_a_model"}, "'not_a_model' is not a timm model"),
        ({"encoder_name": "test_vit"}, "'test_vit' needs >= 2 feature levels with increasing reductions"),
        ({"num_outputs": 5}, r"`num_outputs` must be an integer in \[1, 4\].*got 5"),
        ({"num_outputs": 0}, r"`num_outputs` must be an integer in \[1, 4\].*got 0"),
        ({"decoder_channels": (8, 4)}, r"`decoder_channels` needs 4 entries.*got \(8, 4\)"),
        ({"decoder_channels": (8, 4, 0, 4)}, "`decoder_channels\\[i\\]` must be a positive integer, got 0"),
        ({"num_classes": 0}, "`num_classes` must be a positive integer, got 0"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    kwargs = {"encoder_name": "test_resnet", **kwargs}
    with pytest.raises(ValueError, match=match):
        TimmUNet(**kwargs)


def test_short_fit_lowers_the_loss():
    torch.manual_seed(0)
    net = TimmUNet("test_resnet", num_classes=2, in_channels=1, decoder_channels=(16, 8, 8, 8))
    smooth = F.interpolate(torch.randn(4, 1, 4, 4), size=(32, 32), mode="bilinear")
    x = smooth + 0.1 * torch.randn(4, 1, 32, 32)
    y = (smooth[:, 0] > 0).long()  # blobs: learnable at the 1/2-resolution output
    losses = fit_losses(net, x, y)  # the last map is at 1/2 resolution: upsampled like the loss module does
    assert losses[-1] < 0.5 * losses[0]
