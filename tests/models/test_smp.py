import copy

import pytest
import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from _networks import checked_prediction_network, fit_losses, num_params

from lomix_lightning.models import MultiScaleSMP
from lomix_lightning.models.smp import SUPPORTED_ARCHS

TINY = "tu-test_resnet"  # timm's 0.37 M-parameter test ResNet through smp's timm-universal encoder


@pytest.mark.parametrize(
    ("arch", "num_outputs", "expected_sizes", "kwargs"),
    [
        ("Unet", 4, [8, 16, 32, 64], {"decoder_channels": (32, 16, 16, 8, 8)}),
        ("UnetPlusPlus", 4, [8, 16, 32, 64], {"decoder_channels": (32, 16, 16, 8, 8)}),
        ("MAnet", 3, [16, 32, 64], {"decoder_channels": (32, 16, 16, 8, 8), "decoder_pab_channels": 8}),
        ("Linknet", 5, [4, 8, 16, 32, 64], {}),
        ("FPN", 5, [2, 4, 8, 16, 64], {"decoder_pyramid_channels": 16, "decoder_segmentation_channels": 32}),
        ("UPerNet", 4, [4, 8, 16, 64], {"decoder_channels": 16}),
        ("DeepLabV3Plus", 2, [4, 64], {"decoder_channels": 16}),
    ],
)
def test_outputs_are_coarse_to_fine(arch, num_outputs, expected_sizes, kwargs):
    net = MultiScaleSMP(arch, TINY, num_classes=3, in_channels=1, num_outputs=num_outputs, **kwargs).eval()
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        outputs = net(x)
        assert net.num_outputs == len(outputs) == num_outputs
        assert [p.shape[-1] for p in outputs] == expected_sizes
        assert all(p.shape[:2] == (2, 3) for p in outputs)
        # the last map is the smp model's own output; the others are 1x1 heads on the tapped stages
        torch.testing.assert_close(outputs[-1], net.model(x))


@pytest.mark.parametrize("arch", ["Unet", "UnetPlusPlus", "FPN", "MAnet"])
def test_aux_maps_are_heads_on_the_stage_outputs(arch):
    """Independent capture: clone each tapped stage's output with our own hooks and apply the heads to it."""
    net = MultiScaleSMP(arch, TINY, num_classes=2, in_channels=1, num_outputs=3).eval()
    clones = []
    handles = [m.register_forward_hook(lambda m, a, out: clones.append(out.clone())) for m in net._taps]
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        outputs = net(x)
    for handle in handles:
        handle.remove()
    assert len(clones) == 2
    for head, stage, aux in zip(net.heads, clones, outputs[:-1]):
        torch.testing.assert_close(aux, head(stage))


def test_unet_stages_match_a_manual_decoder_loop():
    net = MultiScaleSMP("Unet", "resnet18", num_classes=2, in_channels=3, num_outputs=4).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        outputs = net(x)
        features = net.model.encoder(x)
        sizes = [f.shape[-2:] for f in features][::-1]
        skips = features[1:][::-1][1:]
        stage = features[-1]
        stages = []
        for i, block in enumerate(net.model.decoder.blocks):  # smp 0.6 UnetDecoder.forward, written out
            stage = block(stage, *sizes[i + 1], skip_connection=skips[i] if i < len(skips) else None)
            stages.append(stage)
    assert [h.in_channels for h in net.heads] == [128, 64, 32]  # smp's default decoder_channels[1:4]
    for head, stage, aux in zip(net.heads, stages[1:4], outputs[:-1]):
        torch.testing.assert_close(aux, head(stage))


def test_gradients_reach_every_head_and_types_match():
    net = MultiScaleSMP("Unet", TINY, num_classes=2, in_channels=1, num_outputs=4)
    x = torch.randn(2, 1, 32, 32)
    outputs = net.train()(x)
    sum(p.square().mean() for p in outputs).backward()
    for head in [*net.heads, net.model.segmentation_head[0]]:
        assert head.weight.grad is not None
        assert head.weight.grad.abs().sum() > 0
    with torch.no_grad():
        assert type(outputs) is type(net.eval()(x)) is list


def test_forward_final_and_prediction_network():
    net = MultiScaleSMP("FPN", TINY, num_classes=2, in_channels=1, num_outputs=4).eval()
    x = torch.randn(2, 1, 64, 64)
    pred = checked_prediction_network(net, x)
    assert num_params(pred) == num_params(net) - num_params(net.auxiliary_heads()) == num_params(net.model)
    assert len(net.auxiliary_heads()) == 3
    assert {p.data_ptr() for p in pred.parameters()} == {p.data_ptr() for p in net.model.parameters()}


def test_from_model_keeps_the_weights():
    model = smp.Unet(TINY, encoder_weights=None, classes=3, in_channels=1).eval()
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        expected = model(x)
        net = MultiScaleSMP.from_model(model, num_outputs=3)
        torch.testing.assert_close(net(x)[-1], expected)
    assert net.model is model
    assert (net.num_classes, net.in_channels, net.num_outputs, net.arch) == (3, 1, 3, "Unet")
    assert num_params(net) == num_params(model) + num_params(net.heads)


def test_hooks_live_only_during_forward_and_deepcopy_works(monkeypatch):
    net = MultiScaleSMP("Unet", TINY, num_classes=2, in_channels=1, num_outputs=3).eval()
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        outputs = net(x)
        assert not any(m._forward_hooks for m in net.model.modules())
        with monkeypatch.context() as patch:  # a failure inside the decoder still removes the hooks
            patch.setattr(net.model.decoder.blocks[-1], "forward", lambda *args, **kwargs: 1 / 0)
            with pytest.raises(ZeroDivisionError):
                net(x)
        assert not any(m._forward_hooks for m in net.model.modules())
        clone = copy.deepcopy(net)
        assert all(a is b for a, b in zip(clone._taps, list(clone.model.decoder.blocks)[-3:-1]))
        for got, expected in zip(clone(x), outputs):
            torch.testing.assert_close(got, expected)


def test_probe_does_not_touch_batchnorm_statistics():
    model = smp.Unet(TINY, encoder_weights=None, classes=2, in_channels=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    MultiScaleSMP.from_model(model, num_outputs=4)
    assert model.training
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"arch": "PAN"}, r"`arch` must be one of \('Unet', .*got 'PAN'"),
        ({"arch": "Unet", "num_outputs": 6}, r"`num_outputs` must be an integer in \[1, 5\].*got 6"),
        ({"arch": "DeepLabV3Plus", "num_outputs": 3}, r"`num_outputs` must be an integer in \[1, 2\].*got 3"),
        ({"arch": "Unet", "num_outputs": 0}, r"got 0"),
        ({"arch": "Unet", "activation": "sigmoid"}, "`activation` cannot be passed.*'sigmoid'"),
        ({"arch": "Unet", "aux_params": {"classes": 2}}, "`aux_params` cannot be passed"),
        ({"arch": "Unet", "num_classes": 0}, "`num_classes` must be a positive integer, got 0"),
        ({"arch": "Unet", "encoder_name": "no_such_encoder"}, "encoder_name='no_such_encoder'"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MultiScaleSMP(**{"encoder_name": TINY, "num_classes": 2, "in_channels": 1, **kwargs})


def test_from_model_rejects_unsupported_models():
    with pytest.raises(ValueError, match=r"PSPNet has no decoder stages to tap; supported architectures: \('Unet'"):
        MultiScaleSMP.from_model(smp.PSPNet(TINY, encoder_weights=None, classes=2))
    with pytest.raises(ValueError, match="classification head"):
        MultiScaleSMP.from_model(smp.Unet(TINY, encoder_weights=None, aux_params={"classes": 2}))
    with pytest.raises(ValueError, match="output activation"):
        MultiScaleSMP.from_model(smp.Unet(TINY, encoder_weights=None, activation="sigmoid"))


def test_supported_archs_cover_the_brief():
    assert {"Unet", "UnetPlusPlus", "FPN", "MAnet"} <= set(SUPPORTED_ARCHS)


def test_short_fit_lowers_the_loss():
    torch.manual_seed(0)
    net = MultiScaleSMP("Unet", TINY, num_classes=2, in_channels=1, num_outputs=3, decoder_channels=(16, 8, 8, 8, 8))
    smooth = F.interpolate(torch.randn(4, 1, 4, 4), size=(32, 32), mode="bilinear")
    x = smooth + 0.1 * torch.randn(4, 1, 32, 32)
    y = (smooth[:, 0] > 0).long()
    losses = fit_losses(net, x, y)
    assert losses[-1] < 0.5 * losses[0]
