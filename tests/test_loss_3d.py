"""LoMixLoss and CombinatorialMutation on volumes: (B, C, D, H, W) maps against a plain loop from the equations."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from lomix_lightning import CombinatorialMutation, LoMixLoss


def _dice_3d(logits, target, keep, eps=1e-5):
    """Eq. of the authors' Dice over every kept voxel: per class 1 - (2 sum(p y) + eps) / (sum p^2 + sum y^2 + eps)."""
    p = logits.softmax(dim=1) * keep[:, None]
    losses = []
    for k in range(logits.shape[1]):
        y = ((target == k) & keep).to(logits.dtype)
        inter = (p[:, k] * y).sum()
        losses.append(1 - (2 * inter + eps) / ((p[:, k] * p[:, k]).sum() + (y * y).sum() + eps))
    return sum(losses) / logits.shape[1]


def _ce_dice_3d(logits, target, ignore_index=None):
    """0.3 CE (mean over kept voxels, ``F.cross_entropy`` on the 5-D map) + 0.7 Dice."""
    keep = torch.ones_like(target, dtype=torch.bool) if ignore_index is None else target != ignore_index
    ce = F.cross_entropy(logits, target, ignore_index=-100 if ignore_index is None else ignore_index)
    return 0.3 * ce + 0.7 * _dice_3d(logits, torch.where(keep, target, 0), keep)


def _mutants_3d(cmm, maps):
    """Every map of Eq. 1-5 in 3-D from first principles: trilinear resize, then add/mul/cat/awf per subset."""
    size = max((m.shape[2:] for m in maps), key=lambda s: s.numel())
    p = [F.interpolate(m, size=size, mode="trilinear", align_corners=False) for m in maps]
    out = {f"P{i + 1}": m for i, m in enumerate(p)}
    for op in cmm.operators:
        for r in range(2, len(p) + 1):
            for subset in itertools.combinations(range(len(p)), r):
                name, key = f"{op}({','.join(str(i + 1) for i in subset)})", "_".join(str(i + 1) for i in subset)
                members = [p[i] for i in subset]
                if op == "add":
                    out[name] = sum(members)
                elif op == "mul":
                    prod = members[0]
                    for m in members[1:]:
                        prod = prod * m
                    out[name] = prod
                elif op == "cat":  # a 1x1x1 convolution over the concatenation (Eq. 3)
                    conv = cmm.cat[key]
                    out[name] = F.conv3d(torch.cat(members, 1), conv.weight[..., None], conv.bias)
                else:  # awf: |S| scores per voxel, softmax over the members, weighted sum (Eq. 4-5)
                    conv = cmm.awf[key]
                    scores = F.conv3d(torch.cat(members, 1), conv.weight[..., None], conv.bias).softmax(dim=1)
                    out[name] = sum(scores[:, j : j + 1] * m for j, m in enumerate(members))
    return out


def _random_volumes(num_classes, dtype=torch.float32):
    sizes = [(2, 3, 4), (4, 6, 8), (4, 6, 8)]  # coarse to fine; two at the finest size (no resize)
    outputs = [torch.randn(2, num_classes, *s, dtype=dtype) for s in sizes]
    target = torch.randint(0, num_classes, (2, 4, 6, 8))
    return outputs, target


def _perturb_fusion(loss):
    """Random cat/awf parameters and loss weights, so no operator sits at a symmetric starting point."""
    with torch.no_grad():
        for param in loss.parameters():
            param.copy_(torch.randn_like(param) * 0.5)


@pytest.mark.parametrize("ignore_index", [None, 5])
@pytest.mark.parametrize("memory_efficient", [False, True])
def test_3d_loss_equals_plain_loop(loss_engine, ignore_index, memory_efficient):
    torch.manual_seed(0)
    loss = LoMixLoss(3, 4, ignore_index=ignore_index, memory_efficient=memory_efficient)
    _perturb_fusion(loss)
    outputs, target = _random_volumes(4)
    if ignore_index is not None:
        target[0, 1:3] = ignore_index  # two whole slices of one volume
        target[1, :, :, 0] = ignore_index
    result = loss(outputs, target)
    maps = _mutants_3d(loss.mutation, outputs)
    assert list(maps) == loss.map_names
    expected = torch.stack([_ce_dice_3d(maps[name], target, ignore_index) for name in loss.map_names])
    torch.testing.assert_close(result.per_map, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(result.total, (loss.weights() * expected).sum(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scheme", ["last_layer", "deep_supervision", "mutation"])
def test_3d_schemes_equal_plain_loop(loss_engine, scheme):
    torch.manual_seed(1)
    loss = LoMixLoss(3, 3, scheme=scheme)
    outputs, target = _random_volumes(3)
    maps = _mutants_3d(loss.mutation, outputs)
    expected = torch.stack([_ce_dice_3d(maps[name], target) for name in loss.map_names])
    torch.testing.assert_close(loss(outputs, target).per_map, expected, rtol=1e-5, atol=1e-5)


def test_3d_gradients_equal_plain_loop(loss_engine):
    torch.manual_seed(2)
    loss = LoMixLoss(3, 3)
    _perturb_fusion(loss)
    outputs, target = _random_volumes(3)
    outputs = [o.requires_grad_() for o in outputs]
    got = torch.autograd.grad(loss(outputs, target).total, [*outputs, *loss.parameters()])
    maps = _mutants_3d(loss.mutation, outputs)
    ref = sum(w * _ce_dice_3d(maps[n], target) for n, w in zip(loss.map_names, loss.weights()))
    want = torch.autograd.grad(ref, [*outputs, *loss.parameters()])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


def test_3d_cmm_maps_equal_plain_loop():
    torch.manual_seed(3)
    cmm = CombinatorialMutation(3, 2)
    with torch.no_grad():
        for param in cmm.parameters():
            param.copy_(torch.randn_like(param))
    outputs, _ = _random_volumes(2)
    got, want = cmm(outputs), _mutants_3d(cmm, outputs)
    for name in cmm.map_names:
        assert got[name].shape == (2, 2, 4, 6, 8)
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-5)


def test_3d_gradcheck_float64():
    loss = LoMixLoss(2, 2).double()
    outputs = tuple(torch.randn(1, 2, *s, dtype=torch.float64, requires_grad=True) for s in ((1, 2, 2), (2, 3, 3)))
    target = torch.randint(0, 2, (1, 2, 3, 3))
    params = tuple(loss.parameters())

    def fn(a, b, *flat):
        return loss([a, b], target).total

    assert torch.autograd.gradcheck(fn, (*outputs, *params), eps=1e-6, atol=1e-5)


def test_3d_bad_inputs_are_named():
    loss = LoMixLoss(2, 3)
    vol = [torch.randn(1, 3, 2, 4, 4), torch.randn(1, 3, 4, 8, 8)]
    with pytest.raises(ValueError, match="mix 2-D and 3-D"):
        loss([torch.randn(1, 3, 4, 4), vol[1]], torch.zeros(1, 4, 8, 8, dtype=torch.long))
    with pytest.raises(ValueError, match=r"expected \(B, D, H, W\)"):
        loss(vol, torch.zeros(1, 8, 8, dtype=torch.long))
    with pytest.raises(ValueError, match=r"expected \(B, H, W\)"):
        loss([torch.randn(1, 3, 4, 4)] * 2, torch.zeros(1, 2, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\) or \(B, C, D, H, W\)"):
        loss([torch.randn(1, 3, 4, 4, 4, 4)] * 2, torch.zeros(1, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="structure' is 2-D only"):
        LoMixLoss(2, 1, loss="structure")([torch.randn(1, 1, 2, 4, 4)] * 2, torch.zeros(1, 2, 4, 4))


def test_3d_callable_loss_sees_volumes():
    seen = []

    def per_map(logits, target):
        seen.append((tuple(logits.shape), tuple(target.shape)))
        return logits.mean()

    LoMixLoss(2, 3, loss=per_map, operators=["add"])([torch.randn(1, 3, 2, 4, 4)] * 2, torch.zeros(1, 2, 4, 4).long())
    assert set(seen) == {((1, 3, 2, 4, 4), (1, 2, 4, 4))}
