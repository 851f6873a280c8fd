import pytest
import torch
from _networks import checked_prediction_network, fit_losses, num_params

from lomix_lightning.models import UNet


def _double_conv_params(c_in: int, c_out: int) -> int:
    # two bias-free 3x3 convs + two BatchNorms (weight and bias per channel)
    return 9 * c_in * c_out + 9 * c_out * c_out + 2 * 2 * c_out


@pytest.mark.parametrize("up_mode", ["transposed", "bilinear"])
@pytest.mark.parametrize(("height", "width"), [(32, 32), (37, 45)])
def test_outputs_are_coarse_to_fine(up_mode, height, width):
    net = UNet(in_channels=2, num_classes=3, base_channels=4, depth=3, up_mode=up_mode)
    outputs = net(torch.randn(2, 2, height, width))
    assert net.num_outputs == len(outputs) == 3
    assert (net.num_classes, net.in_channels) == (3, 2)
    # stage s sits at the resolution of encoder level depth-1-s (floor division by pooling)
    expected = [(height // 4, width // 4), (height // 2, width // 2), (height, width)]
    assert [tuple(p.shape[-2:]) for p in outputs] == expected
    assert all(p.shape[:2] == (2, 3) for p in outputs)


def test_default_is_four_outputs():
    net = UNet()
    outputs = net(torch.randn(1, 1, 64, 64))
    assert [p.shape[-1] for p in outputs] == [8, 16, 32, 64]


@pytest.mark.parametrize("up_mode", ["transposed", "bilinear"])
def test_parameter_count_matches_hand_count(up_mode):
    net = UNet(in_channels=1, num_classes=2, base_channels=4, depth=2, up_mode=up_mode)
    encoder = _double_conv_params(1, 4) + _double_conv_params(4, 8) + _double_conv_params(8, 16)
    if up_mode == "transposed":
        # ConvTranspose 2x2 (c_in * c_out * 4 + bias), then DoubleConv(2 * skip, skip)
        decoder = (16 * 8 * 4 + 8) + _double_conv_params(16, 8) + (8 * 4 * 4 + 4) + _double_conv_params(8, 4)
    else:
        decoder = _double_conv_params(16 + 8, 8) + _double_conv_params(8 + 4, 4)
    heads = (8 * 2 + 2) + (4 * 2 + 2)
    assert num_params(net) == encoder + decoder + heads


def test_gradients_reach_every_head():
    net = UNet(in_channels=1, num_classes=3, base_channels=4, depth=3)
    sum(p.square().mean() for p in net(torch.randn(2, 1, 16, 16))).backward()
    for head in net.heads:
        assert head.weight.grad is not None
        assert head.weight.grad.abs().sum() > 0


def test_train_and_eval_return_the_same_type():
    net = UNet(in_channels=1, num_classes=3, base_channels=4, depth=2)
    x = torch.randn(2, 1, 16, 16)
    train_out = net.train()(x)
    eval_out = net.eval()(x)
    assert type(train_out) is type(eval_out) is list
    assert len(train_out) == len(eval_out) == 2


def test_forward_final_and_prediction_network_match_last_map():
    net = UNet(in_channels=1, num_classes=3, base_channels=4, depth=3).eval()
    x = torch.randn(2, 1, 24, 24)
    pred = checked_prediction_network(net, x)
    assert num_params(pred) == num_params(net) - num_params(net.auxiliary_heads())
    assert len(net.auxiliary_heads()) == net.num_outputs - 1
    # shared, not copied
    pred_ptrs = {p.data_ptr() for p in pred.parameters()}
    assert pred_ptrs <= {p.data_ptr() for p in net.parameters()}
    assert not pred_ptrs & {p.data_ptr() for p in net.auxiliary_heads().parameters()}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"depth": 0}, "`depth` must be a positive integer, got 0"),
        ({"base_channels": -4}, "`base_channels` must be a positive integer, got -4"),
        ({"num_classes": 2.5}, "`num_classes` must be a positive integer, got 2.5"),
        ({"in_channels": True}, "`in_channels` must be a positive integer, got True"),
        ({"up_mode": "nearest"}, "`up_mode` must be one of .*got 'nearest'"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        UNet(**kwargs)


def test_wrong_input_channels_raise():
    net = UNet(in_channels=1, num_classes=2, base_channels=4, depth=2)
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\), got \(2, 3, 16, 16\)"):
        net(torch.randn(2, 3, 16, 16))


def test_short_fit_lowers_the_loss():
    torch.manual_seed(0)
    net = UNet(in_channels=1, num_classes=2, base_channels=4, depth=2)
    x = torch.randn(4, 1, 16, 16)
    y = (x[:, 0] > 0).long()  # a per-pixel threshold the network can learn
    losses = fit_losses(net, x, y)
    assert losses[-1] < 0.5 * losses[0]
