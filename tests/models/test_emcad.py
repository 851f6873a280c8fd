import pytest
import timm
import torch
import torch.nn.functional as F
from _networks import checked_prediction_network, num_params

from lomix_lightning.models import EMCADNet
from lomix_lightning.models.emcad import EMCADDecoder
from lomix_lightning.models.emcad_blocks import CAB, EUCB, LGAG, MSCB, SAB, channel_shuffle


def _analytic_decoder_params(channels, num_classes):
    """Hand count of the reference EMCAD decoder + heads for expansion 2, kernels (1, 3, 5), LGAG kernel 3."""
    mscb = sum(4 * c * c + 88 * c for c in channels)  # 2c^2 + 4c (pconv1) + 70c + 12c (MSDC) + 2c^2 + 2c (pconv2)
    cab = sum(2 * c * (c // 16) for c in channels)  # fc1 + fc2, no bias
    eucb = sum(9 * a + 2 * a + a * b + b for a, b in zip(channels[:-1], channels[1:]))  # dw + BN + 1x1 with bias
    lgag = sum(2 * (9 * c + c // 2 + c) + c // 2 + 1 + 2 for c in channels[1:])  # W_g, W_x (+BN), psi conv + BN(1)
    sab = 2 * 7 * 7
    heads = sum(c * num_classes + num_classes for c in channels)
    return mscb + cab + eucb + lgag + sab, heads


def test_pvt_v2_b2_parameter_count_matches_the_paper():
    with torch.device("meta"):  # no memory, no init cost
        net = EMCADNet(num_classes=9, encoder="pvt_v2_b2", in_channels=1)
    decoder, heads = _analytic_decoder_params((512, 320, 128, 64), num_classes=9)
    assert decoder == 1_913_515  # reference-implementation.md section 2.1
    assert heads == 9_252
    assert num_params(net.decoder) == decoder
    assert num_params(net.heads) == heads
    assert num_params(net.encoder.stem) == 12
    assert num_params(net.encoder.backbone) == 24_849_856
    total = num_params(net)
    assert total == 24_849_856 + 1_913_515 + 9_252 + 12 == 26_772_635
    assert abs(total - 26.76e6) / 26.76e6 < 0.01  # EMCAD / LoMix paper: 26.76 M


def test_pvt_v2_b0_forward_at_64():
    torch.manual_seed(0)
    net = EMCADNet(num_classes=4, encoder="pvt_v2_b0", in_channels=1)
    decoder, heads = _analytic_decoder_params((256, 160, 64, 32), num_classes=4)
    assert num_params(net.decoder) == decoder
    assert num_params(net.heads) == heads
    outputs = net(torch.randn(2, 1, 64, 64))
    assert net.num_outputs == len(outputs) == 4
    assert [tuple(p.shape) for p in outputs] == [(2, 4, 2, 2), (2, 4, 4, 4), (2, 4, 8, 8), (2, 4, 16, 16)]
    assert net.reductions == (32, 16, 8, 4)
    sum(p.square().mean() for p in outputs).backward()
    for head in net.heads:
        assert head.weight.grad is not None
        assert head.weight.grad.abs().sum() > 0
    assert net.encoder.stem[0].weight.grad.abs().sum() > 0


def test_decoder_structure_follows_the_reference():
    dec = EMCADDecoder((512, 320, 128, 64), activation="relu6")
    assert sum(isinstance(m, SAB) for m in dec.modules()) == 1  # one SAB shared by the four stages
    assert [type(m) for m in dec.mscbs] == [MSCB] * 4
    assert [m.up_dwc[0].scale_factor for m in dec.eucbs] == [2.0] * 3
    assert [m.W_g[0].groups for m in dec.lgags] == [160, 64, 32]
    assert [m.fc1.out_channels for m in dec.cabs] == [32, 20, 8, 4]
    assert [m.shuffle_groups for m in dec.mscbs] == [512, 320, 128, 64]  # gcd(2c, c) with expansion 2
    # activation placement: MSCB (pconv1 + MSDC) use the argument; EUCB, LGAG and CAB keep ReLU
    mscb_acts = {type(m) for m in dec.mscbs.modules() if isinstance(m, torch.nn.ReLU | torch.nn.ReLU6)}
    assert mscb_acts == {torch.nn.ReLU6}
    for blocks in (dec.eucbs, dec.lgags, dec.cabs):
        assert {type(m) for m in blocks.modules() if isinstance(m, torch.nn.ReLU | torch.nn.ReLU6)} == {torch.nn.ReLU}


def test_decoder_init_is_normal_002():
    torch.manual_seed(0)
    dec = EMCADDecoder((64, 32))
    weights = torch.cat([m.weight.flatten() for m in dec.modules() if isinstance(m, torch.nn.Conv2d)])
    assert abs(weights.std().item() - 0.02) < 0.002
    biases = [m.bias for m in dec.modules() if isinstance(m, torch.nn.Conv2d) and m.bias is not None]
    assert all(torch.all(b == 0) for b in biases)


def test_decoder_forward_matches_a_hand_written_stage_loop():
    torch.manual_seed(0)
    dec = EMCADDecoder((32, 16, 8)).eval()
    feats = [torch.randn(1, 32, 2, 2), torch.randn(1, 16, 4, 4), torch.randn(1, 8, 8, 8)]
    with torch.no_grad():
        outs = dec(feats)
        d4 = dec.cabs[0](feats[0]) * feats[0]
        d4 = dec.mscbs[0](dec.sab(d4) * d4)
        d3 = dec.eucbs[0](d4)
        d3 = d3 + dec.lgags[0](d3, feats[1])
        d3 = dec.cabs[1](d3) * d3
        d3 = dec.mscbs[1](dec.sab(d3) * d3)
        d2 = dec.eucbs[1](d3)
        d2 = d2 + dec.lgags[1](d2, feats[2])
        d2 = dec.cabs[2](d2) * d2
        d2 = dec.mscbs[2](dec.sab(d2) * d2)
    for got, expected in zip(outs, (d4, d3, d2)):
        torch.testing.assert_close(got, expected)


def test_blocks_against_plain_formulas():
    torch.manual_seed(0)
    x = torch.randn(2, 8, 5, 5)
    cab, sab, lgag = CAB(8).eval(), SAB().eval(), LGAG(8).eval()
    with torch.no_grad():
        mlp = lambda v: cab.fc2(F.relu(cab.fc1(v)))  # noqa: E731
        expected_cab = torch.sigmoid(mlp(x.mean((2, 3), keepdim=True)) + mlp(x.amax((2, 3), keepdim=True)))
        torch.testing.assert_close(cab(x), expected_cab)
        pooled = torch.stack([x.mean(1), x.max(1).values], dim=1)
        torch.testing.assert_close(sab(x), torch.sigmoid(F.conv2d(pooled, sab.conv.weight, padding=3)))
        g = torch.randn(2, 8, 5, 5)
        gate = torch.sigmoid(lgag.psi[:2](F.relu(lgag.W_g(g) + lgag.W_x(x))))
        torch.testing.assert_close(lgag(g, x), x * gate)
        eucb = EUCB(8, 4).eval()
        up = F.interpolate(x, scale_factor=2, mode="nearest")
        torch.testing.assert_close(eucb(x), eucb.pwc(eucb.up_dwc[1:](up)))
    assert tuple(eucb(x).shape) == (2, 4, 10, 10)


def test_channel_shuffle_by_hand():
    x = torch.arange(8.0).view(1, 8, 1, 1)
    assert channel_shuffle(x, groups=4).flatten().tolist() == [0, 2, 4, 6, 1, 3, 5, 7]
    assert channel_shuffle(x, groups=8).flatten().tolist() == list(range(8))  # one channel per group: identity


@pytest.mark.parametrize(("dw_parallel", "add"), [(True, True), (False, True), (True, False)])
def test_mscb_variants(dw_parallel, add):
    block = MSCB(8, 8, kernel_sizes=(1, 3), dw_parallel=dw_parallel, add=add).eval()
    x = torch.randn(1, 8, 4, 4)
    with torch.no_grad():
        hidden = block.pconv1(x)
        first = block.msdc.dwconvs[0](hidden)
        second = block.msdc.dwconvs[1](hidden if dw_parallel else hidden + first)
        combined = first + second if add else torch.cat([first, second], 1)
        expected = x + block.pconv2(channel_shuffle(combined, block.shuffle_groups))
        torch.testing.assert_close(block(x), expected)


def test_three_channel_input_skips_the_stem_and_other_encoders_work():
    net = EMCADNet(num_classes=2, encoder="test_resnet", in_channels=3, drop_path_rate=0.0)
    assert isinstance(net.encoder.stem, torch.nn.Identity)
    channels = timm.create_model("test_resnet", features_only=True).feature_info.channels()
    assert [h.in_channels for h in net.heads] == channels[-4:][::-1]  # the four deepest levels, coarse to fine
    assert [p.shape[-1] for p in net(torch.randn(1, 3, 64, 64))] == [2, 4, 8, 16]


def test_final_prediction_network_and_types():
    net = EMCADNet(num_classes=3, encoder="test_convnext", in_channels=1)
    x = torch.randn(2, 1, 32, 32)
    assert type(net.train()(x)) is list
    pred = checked_prediction_network(net, x)
    assert num_params(pred) == num_params(net) - num_params(net.auxiliary_heads())
    assert len(net.auxiliary_heads()) == 3
    assert {p.data_ptr() for p in pred.parameters()} <= {p.data_ptr() for p in net.parameters()}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"encoder": "not_a_model"}, "'not_a_model' is not a timm model"),
        ({"encoder": "test_vit"}, "stride doubles per level"),
        ({"kernel_sizes": (1, 4)}, r"`kernel_sizes` must be odd.*\(1, 4\)"),
        ({"kernel_sizes": ()}, "non-empty sequence"),
        ({"lgag_kernel_size": 2}, r"`lgag_kernel_size` must be odd.*\(2,\)"),
        ({"activation": "tanh"}, "`activation` must be one of .*got 'tanh'"),
        ({"expansion_factor": 0}, "`expansion_factor` must be a positive integer, got 0"),
        ({"num_classes": -1}, "`num_classes` must be a positive integer, got -1"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EMCADNet(**{"encoder": "test_convnext", **kwargs})


def test_bad_inputs_raise():
    net = EMCADNet(num_classes=2, encoder="test_convnext", in_channels=1)
    with pytest.raises(ValueError, match=r"divisible by 32, got \(48, 40\)"):
        net(torch.randn(1, 1, 48, 40))
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\), got \(1, 3, 32, 32\)"):
        net(torch.randn(1, 3, 32, 32))
