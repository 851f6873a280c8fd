"""LoMixLoss and the per-map losses against independent computations."""

import math

import pytest
import torch
import torch.nn.functional as F

from lomix_lightning import CombinatorialMutation, LoMixLoss, ce_dice_loss, structure_loss
from lomix_lightning.losses.weighting import FixedWeighting, LossWeighting, SoftplusWeighting


def _dice_reference(logits, target, eps=1e-5):
    """The authors' DiceLoss: softmax, one-hot, per class 1 - (2 sum(p y) + eps) / (sum p^2 + sum y^2 + eps), mean."""
    p = logits.softmax(dim=1)
    c = logits.shape[1]
    losses = []
    for k in range(c):
        y = (target == k).float()
        inter = (p[:, k] * y).sum()
        losses.append(1 - (2 * inter + eps) / ((p[:, k] * p[:, k]).sum() + (y * y).sum() + eps))
    return sum(losses) / c


def _ce_dice_reference(logits, target, beta=0.3, gamma=0.7):
    return beta * F.cross_entropy(logits, target) + gamma * _dice_reference(logits, target)


def _structure_reference(pred, mask):
    """PraNet's structure loss with the BCE really weighted (one image at a time, explicit formulas)."""
    out = []
    for i in range(pred.shape[0]):
        z, y = pred[i, 0].double(), mask[i, 0].double()
        weit = 1 + 5 * (F.avg_pool2d(y[None, None], 31, 1, 15)[0, 0] - y).abs()
        bce = torch.clamp(z, min=0) - z * y + torch.log1p(torch.exp(-z.abs()))
        wbce = (weit * bce).sum() / weit.sum()
        p = torch.sigmoid(z)
        inter = (p * y * weit).sum()
        union = ((p + y) * weit).sum()
        out.append(wbce + 1 - (inter + 1) / (union - inter + 1))
    return torch.stack(out).mean()


def test_ce_dice_matches_reference_and_batches(device):
    logits = torch.randn(3, 5, 4, 6, 6, device=device)  # (B, M, C, H, W)
    target = torch.randint(0, 4, (3, 6, 6), device=device)
    batched = ce_dice_loss(logits, target)
    assert batched.shape == (5,)
    for m in range(5):
        torch.testing.assert_close(batched[m], _ce_dice_reference(logits[:, m], target), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ce_dice_loss(logits[:, m], target), batched[m])


def test_ce_dice_coefficients_and_absent_class():
    logits = torch.randn(2, 3, 5, 5)
    target = torch.zeros(2, 5, 5, dtype=torch.long)  # classes 1 and 2 absent: their Dice term is ~1 - eps/(sum p^2+eps)
    ce_only = ce_dice_loss(logits, target, ce_weight=1.0, dice_weight=0.0)
    torch.testing.assert_close(ce_only, F.cross_entropy(logits, target))
    dice_only = ce_dice_loss(logits, target, ce_weight=0.0, dice_weight=1.0)
    torch.testing.assert_close(dice_only, _dice_reference(logits, target))


def test_ce_dice_ignore_index(device):
    logits = torch.randn(2, 3, 4, 4, device=device)
    target = torch.randint(0, 3, (2, 4, 4), device=device)
    target_ignored = target.clone()
    target_ignored[:, 0] = 255
    got = ce_dice_loss(logits, target_ignored, ignore_index=255)
    keep = target_ignored != 255
    ce = F.cross_entropy(logits, target_ignored, ignore_index=255)
    # Dice only over kept pixels: flatten them into a (N, C, 1, 1) batch
    flat_logits = logits.permute(0, 2, 3, 1)[keep][:, :, None, None]
    dice = _dice_reference(flat_logits, target[keep][:, None, None])
    torch.testing.assert_close(got, 0.3 * ce + 0.7 * dice)


def test_structure_loss_matches_reference():
    pred = torch.randn(2, 3, 1, 40, 40)
    mask = (torch.rand(2, 40, 40) > 0.6).float()
    got = structure_loss(pred, mask)
    for m in range(3):
        ref = _structure_reference(pred[:, m], mask[:, None])
        torch.testing.assert_close(got[m].double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(structure_loss(pred[:, 0], mask[:, None]), got[0])


def _loop_total(loss, outputs, target):
    """Eq. 9 by a plain loop: every map from the CMM, its CE + Dice, times softplus(alpha) or 1."""
    cmm = loss.mutation
    maps = cmm(outputs)
    weights = loss.weights()
    total = 0.0
    for name, w in zip(loss.map_names, weights):
        total = total + w * _ce_dice_reference(maps[name], target)
    return total


@pytest.mark.parametrize("scheme", ["last_layer", "deep_supervision", "mutation", "lomix"])
def test_total_equals_plain_loop(scheme, loss_engine, device):
    loss = LoMixLoss(3, 4, scheme=scheme).to(device)
    outputs = [torch.randn(2, 4, s, s, device=device) for s in (4, 8, 16)]
    target = torch.randint(0, 4, (2, 16, 16), device=device)
    result = loss(outputs, target)
    torch.testing.assert_close(result.total, _loop_total(loss, outputs, target), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(result.total, result.original + result.mutant)
    torch.testing.assert_close(result.total, (result.weights * result.per_map).sum())


def test_scheme_map_sets_and_initial_weights():
    expected = {"last_layer": 1, "deep_supervision": 4, "mutation": 4 + 11, "lomix": 4 + 44}
    for scheme, count in expected.items():
        loss = LoMixLoss(4, 3, scheme=scheme)
        assert loss.num_maps == count
        w = loss.weights()
        assert torch.allclose(w, torch.full((count,), math.log(2) if scheme == "lomix" else 1.0))
        assert isinstance(loss.weighting, SoftplusWeighting if scheme == "lomix" else FixedWeighting)
    assert LoMixLoss(4, 3, scheme="last_layer").map_names == ["P4"]
    assert LoMixLoss(4, 3, scheme="deep_supervision").map_names == ["P1", "P2", "P3", "P4"]
    assert set(LoMixLoss(4, 3, scheme="mutation").map_families) == {"original", "add"}


def test_overrides_make_every_ablation_one_argument():
    learned_ds = LoMixLoss(4, 3, scheme="deep_supervision", weighting="learned")
    assert learned_ds.learnable and learned_ds.num_maps == 4
    fixed_lomix = LoMixLoss(4, 3, scheme="lomix", weighting="fixed")
    assert not fixed_lomix.learnable and not list(fixed_lomix.weighting.parameters())
    mul_only = LoMixLoss(4, 3, operators=["mul"])
    assert mul_only.map_names[4:] == [n for n in mul_only.map_names if n.startswith("mul")]
    assert mul_only.num_maps == 15


def test_last_layer_uses_only_the_final_map():
    loss = LoMixLoss(3, 4, scheme="last_layer")
    outputs = [torch.randn(2, 4, s, s, requires_grad=True) for s in (4, 8, 8)]
    target = torch.randint(0, 4, (2, 8, 8))
    result = loss(outputs, target)
    torch.testing.assert_close(result.total, _ce_dice_reference(outputs[-1], target))
    result.total.backward()
    # the ignored maps stay in the graph with a zero weight (DDP needs every head used) but get no signal
    assert torch.count_nonzero(outputs[0].grad) == 0 and outputs[-1].grad.abs().sum() > 0


def test_every_alpha_and_fusion_parameter_gets_a_gradient():
    loss = LoMixLoss(4, 3)
    outputs = [torch.randn(2, 3, s, s) for s in (2, 4, 8, 8)]
    loss(outputs, torch.randint(0, 3, (2, 8, 8))).total.backward()
    for name, p in loss.named_parameters():
        assert p.grad is not None and torch.all(p.grad != 0) if "alpha" in name else p.grad.abs().sum() > 0, name
    # d total / d alpha_u = sigmoid(alpha_u) * L_u (> 0): the weights can only shrink
    result = loss(outputs, torch.randint(0, 3, (2, 8, 8)))
    loss.zero_grad()
    result.total.backward()
    torch.testing.assert_close(loss.weighting.alpha.grad, torch.sigmoid(loss.weighting.alpha) * result.per_map.detach())


def test_weights_dict_and_families():
    loss = LoMixLoss(2, 3)
    assert loss.weights_dict() == pytest.approx(dict.fromkeys(loss.map_names, math.log(2)))
    assert loss.map_families == ["original", "original", "add", "mul", "cat", "awf"]


def test_structure_loss_binary_scheme():
    loss = LoMixLoss(3, 1, loss="structure")
    outputs = [torch.randn(2, 1, s, s) for s in (8, 16, 32)]
    mask = (torch.rand(2, 1, 32, 32) > 0.5).float()
    result = loss(outputs, mask)
    maps = loss.mutation(outputs)
    ref = sum(w * _structure_reference(maps[n], mask) for n, w in zip(loss.map_names, loss.weights().tolist()))
    torch.testing.assert_close(result.total.double(), ref, rtol=1e-5, atol=1e-5)
    loss(outputs, mask[:, 0].long())  # (B, H, W) integer masks work too


def test_user_callable_loss():
    calls = []

    def l1(logits, target):
        calls.append(logits.shape)
        return (logits.softmax(1) - F.one_hot(target, 3).permute(0, 3, 1, 2)).abs().mean()

    loss = LoMixLoss(2, 3, loss=l1)
    outputs = [torch.randn(2, 3, 4, 4), torch.randn(2, 3, 8, 8)]
    target = torch.randint(0, 3, (2, 8, 8))
    result = loss(outputs, target)
    assert len(calls) == 6 and calls[0] == (2, 3, 8, 8)
    maps = loss.mutation(outputs)
    torch.testing.assert_close(result.per_map, torch.stack([l1(maps[n], target) for n in loss.map_names]))


def test_custom_weighting_strategy():
    class Halves(LossWeighting):
        def forward(self):
            return torch.full((self.num_maps,), 0.5)

    loss = LoMixLoss(2, 3, weighting=Halves(6))
    result = loss([torch.randn(1, 3, 4, 4)] * 2, torch.zeros(1, 4, 4, dtype=torch.long))
    torch.testing.assert_close(result.total, 0.5 * result.per_map.sum())
    with pytest.raises(ValueError, match="num_maps=5 but the loss supervises 6"):
        LoMixLoss(2, 3, weighting=Halves(5))


def test_gradcheck_float64():
    loss = LoMixLoss(2, 2).double()
    outputs = tuple(torch.randn(1, 2, s, s, dtype=torch.float64, requires_grad=True) for s in (2, 4))
    target = torch.randint(0, 2, (1, 4, 4))
    params = tuple(loss.parameters())

    def fn(a, b, *flat):
        return loss([a, b], target).total

    assert torch.autograd.gradcheck(fn, (*outputs, *params), eps=1e-6, atol=1e-5)


def test_bf16_autocast_finite_and_float32():
    loss = LoMixLoss(4, 3)
    outputs = [torch.randn(2, 3, s, s) * 10 for s in (2, 4, 8, 8)]
    target = torch.randint(0, 3, (2, 8, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = [o.to(torch.bfloat16) for o in outputs]
        result = loss(half, target)
    assert result.total.dtype == torch.float32 and torch.isfinite(result.total)
    full = loss(outputs, target)
    assert torch.isclose(result.total, full.total, rtol=0.05)


def test_bad_inputs():
    loss = LoMixLoss(3, 4)
    outputs = [torch.randn(2, 4, s, s) for s in (4, 8, 8)]
    good = torch.randint(0, 4, (2, 8, 8))
    with pytest.raises(ValueError, match="target has shape \\(2, 4, 4\\), expected \\(B, H, W\\) = \\(2, 8, 8\\)"):
        loss(outputs, good[:, :4, :4])
    bad = good.clone()
    bad[0, 0, 0], bad[1, 1, 1] = 7, -1
    with pytest.raises(ValueError, match="labels \\[-1, 7\\] outside \\[0, 4\\)"):
        loss(outputs, bad)
    with pytest.raises(TypeError, match="integer class indices"):
        loss(outputs, good.float())
    with pytest.raises(ValueError, match="expected 3 output maps"):
        loss(outputs[:2], good)
    ignoring = LoMixLoss(3, 4, ignore_index=255)
    ignored = good.clone()
    ignored[0, 0] = 255
    assert torch.isfinite(ignoring(outputs, ignored).total)
    with pytest.raises(ValueError, match="unknown scheme 'lomx'"):
        LoMixLoss(3, 4, scheme="lomx")
    with pytest.raises(ValueError, match="unknown loss 'dice'"):
        LoMixLoss(3, 4, loss="dice")
    with pytest.raises(ValueError, match="unknown weighting 'learnt'"):
        LoMixLoss(3, 4, weighting="learnt")
    with pytest.raises(ValueError, match="unknown operator 'concat'"):
        LoMixLoss(3, 4, operators=["concat"])
    with pytest.raises(ValueError, match="operators must be empty"):
        LoMixLoss(3, 4, scheme="last_layer", operators=["add"])
    with pytest.raises(ValueError, match="needs num_classes >= 2"):
        LoMixLoss(3, 1)
    with pytest.raises(ValueError, match="needs num_classes=1"):
        LoMixLoss(3, 2, loss="structure")
    with pytest.raises(ValueError, match="num_outputs must be an integer >= 1"):
        LoMixLoss(0, 2)
    binary = LoMixLoss(2, 1, loss="structure")
    with pytest.raises(ValueError, match="labels \\[2\\] outside \\[0, 1\\]"):
        binary([torch.randn(1, 1, 4, 4)] * 2, torch.full((1, 4, 4), 2))


def test_module_matches_cmm_map_order():
    loss = LoMixLoss(3, 2)
    assert isinstance(loss.mutation, CombinatorialMutation)
    assert loss.map_names == loss.mutation.map_names


def test_ce_dice_gradcheck_with_ignore_index():
    logits = torch.randn(2, 3, 3, 4, 4, dtype=torch.float64, requires_grad=True)  # (B, M, C, H, W)
    target = torch.randint(0, 3, (2, 4, 4))
    target[0, :2] = 7

    def fn(z):
        return ce_dice_loss(z, target, ignore_index=7)

    assert torch.autograd.gradcheck(fn, (logits,), eps=1e-6, atol=1e-6)


def test_ce_dice_large_logit_gaps_match_log_softmax():
    """CE uses z_t - max z + log max p instead of a log-softmax pass: exact also where p_t underflows."""
    logits = torch.randn(2, 4, 5, 5) * 200.0  # products of logits reach such gaps
    target = torch.randint(0, 4, (2, 5, 5))
    got = ce_dice_loss(logits, target, ce_weight=1.0, dice_weight=0.0)
    assert torch.isfinite(got)
    torch.testing.assert_close(got, F.cross_entropy(logits, target), rtol=1e-5, atol=1e-4)


def test_single_output_with_operators_has_no_mutants():
    loss = LoMixLoss(1, 3, scheme="mutation")
    outputs = [torch.randn(2, 3, 8, 8, requires_grad=True)]
    target = torch.randint(0, 3, (2, 8, 8))
    result = loss(outputs, target)
    assert loss.map_names == ["P1"] and result.per_map.shape == (1,)
    torch.testing.assert_close(result.total, _ce_dice_reference(outputs[0], target))
    result.total.backward()
    assert outputs[0].grad.abs().sum() > 0
