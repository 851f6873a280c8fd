"""The MONAI adapters against the MONAI networks they wrap: same maps, same order, same eval output."""

import sys

import pytest
import torch
import torch.nn.functional as F
from _networks import checked_prediction_network, num_params

from lomix_lightning import LoMixLoss
from lomix_lightning.errors import LomixUserError
from lomix_lightning.models.monai import MonaiDynUNet, MonaiSegResNetDS, require_monai

pytest.importorskip("monai")


def _dynunet(spatial_dims):
    torch.manual_seed(0)
    return MonaiDynUNet(2, 3, spatial_dims=spatial_dims, strides=(1, 2, 2, 2), filters=(4, 8, 8, 16), deep_supr_num=2)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_dynunet_maps_are_monai_heads_coarse_to_fine(spatial_dims):
    net = _dynunet(spatial_dims)
    x = torch.randn(2, 2, *[16] * spatial_dims)
    net.train()
    with torch.no_grad():
        ours = net(x)
        stacked = net.net(x)  # MONAI's training output: (B, 1 + k, C, *spatial), final first, heads nearest-upsampled
    assert [tuple(o.shape[2:]) for o in ours] == [(4,) * spatial_dims, (8,) * spatial_dims, (16,) * spatial_dims]
    assert stacked.shape[1] == 3
    torch.testing.assert_close(ours[-1], stacked[:, 0])
    for j, aux in enumerate(reversed(ours[:-1]), start=1):  # MONAI: finest auxiliary head first
        torch.testing.assert_close(F.interpolate(aux, size=x.shape[2:]), stacked[:, j])
        torch.testing.assert_close(aux, net.net.heads[j - 1])  # and the native-resolution map it kept


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_dynunet_eval_and_export_equal_monai_eval(spatial_dims):
    net = _dynunet(spatial_dims)
    x = torch.randn(1, 2, *[16] * spatial_dims)
    pred = checked_prediction_network(net, x)  # eval: forward()[-1] == forward_final == prediction_network()
    with torch.no_grad():
        torch.testing.assert_close(pred(x), net.net.eval()(x))
    head_ids = {id(p) for p in net.auxiliary_heads().parameters()}
    assert head_ids and not head_ids & {id(p) for p in pred.parameters()}
    assert num_params(pred) == num_params(net) - num_params(net.auxiliary_heads())


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_segresnetds_equals_monai(spatial_dims):
    torch.manual_seed(0)
    net = MonaiSegResNetDS(2, 3, spatial_dims=spatial_dims, init_filters=4, blocks_down=(1, 1, 1), dsdepth=2)
    x = torch.randn(2, 2, *[8] * spatial_dims)
    net.train()
    with torch.no_grad():
        ours, theirs = net(x), net.net(x)  # MONAI in training: a finest-first list
    assert len(ours) == len(theirs) == 2
    for a, b in zip(ours, reversed(theirs)):
        torch.testing.assert_close(a, b)
    pred = checked_prediction_network(net, x)
    with torch.no_grad():
        torch.testing.assert_close(pred(x), net.net.eval()(x))
    assert num_params(pred) == num_params(net) - num_params(net.auxiliary_heads())


def test_dynunet_trains_with_lomix_3d():
    net = _dynunet(3)
    loss = LoMixLoss(net.num_outputs, 3)
    x, y = torch.randn(1, 2, 16, 16, 16), torch.randint(0, 3, (1, 16, 16, 16))
    loss(net(x), y).total.backward()
    assert all(p.grad is not None for p in net.auxiliary_heads().parameters())


def test_adapter_errors_name_the_fix(monkeypatch):
    with pytest.raises(LomixUserError, match="deep_supr_num"):
        MonaiDynUNet(1, 2, strides=(1, 2, 2), deep_supr_num=2)
    with pytest.raises(LomixUserError, match="spatial_dims"):
        MonaiDynUNet(1, 2, spatial_dims=1)
    with pytest.raises(LomixUserError, match=r"\(B, 1, D, H, W\)"):
        MonaiDynUNet(1, 2, strides=(1, 2, 2), filters=(2, 2, 2), deep_supr_num=1)(torch.zeros(1, 1, 8, 8))
    with pytest.raises(LomixUserError, match=r"divisible by \[2, 4, 4\]"):
        MonaiDynUNet(1, 2, strides=(1, [1, 2, 2], 2), filters=(2, 2, 2), deep_supr_num=1)(torch.zeros(1, 1, 4, 8, 6))
    with pytest.raises(LomixUserError, match="divisible"):
        MonaiSegResNetDS(1, 2, spatial_dims=2, init_filters=2, blocks_down=(1, 1), dsdepth=1)(torch.zeros(1, 1, 7, 8))
    monkeypatch.setitem(sys.modules, "monai", None)  # as if not installed
    with pytest.raises(ImportError, match=r'pip install "lomix-lightning\[monai\]"'):
        require_monai()
