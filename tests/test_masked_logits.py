"""Masked logits (-inf, a common way to forbid a class) and ignored pixels on both engines (issue #13, item 4).

The definition, for every map the loss scores: CE is ``F.cross_entropy`` (with ``ignore_index``) and Dice is computed
over the counted pixels only, so

* a ``-inf`` logit in a class other than the target counts as probability 0 (finite loss and gradient);
* a whole class at ``-inf`` (never the target) has probability 0 everywhere: its Dice term is ``1 - eps / eps = 0``;
* an ignored pixel counts in nothing, whatever its logits (all ``-inf``, or NaN): finite loss, zero gradient there;
* a ``-inf`` logit in the target class makes CE (and the loss) ``+inf``: the module's ``nonfinite_loss`` then raises
  or skips the batch. The gradient stays finite (``softmax - onehot``).

Fusing masked maps (``mul``, ``cat``, ``awf`` of a ``-inf``) follows IEEE arithmetic and may give NaN mutants; that is
not defined further. Each case runs on the compiled kernels and on the PyTorch engine, on every available device.
"""

import pytest
import torch
import torch.nn.functional as F

from lomix_lightning import LoMixLoss

INF = float("inf")


def _reference(logits, target, ignore_index=None, eps=1e-5):
    """0.3 F.cross_entropy + 0.7 Dice, the Dice over the counted pixels only (float64, plain autograd)."""
    ce = F.cross_entropy(logits, target, ignore_index=-100 if ignore_index is None else ignore_index)
    keep = torch.ones_like(target, dtype=torch.bool) if ignore_index is None else target != ignore_index
    z = logits.permute(0, 2, 3, 1)[keep]  # (N, C): counted pixels only
    p, y = z.softmax(dim=1), F.one_hot(target[keep], logits.shape[1]).to(z.dtype)
    dice = 1 - ((2 * (p * y).sum(0) + eps) / ((p * p).sum(0) + y.sum(0) + eps)).mean()
    return 0.3 * ce + 0.7 * dice


def _both(maps, target, device, ignore_index=None):
    """(per-map losses, gradients) of a two-map deep-supervision loss and of the float64 reference."""
    maps, target = [m.to(device) for m in maps], target.to(device)
    leaves = [m.clone().requires_grad_() for m in maps]
    result = LoMixLoss(2, maps[0].shape[1], "deep_supervision", ignore_index=ignore_index)(leaves, target)
    result.total.backward()
    ref_leaves = [m.double().requires_grad_() for m in maps]
    ref = torch.stack([_reference(m, target, ignore_index) for m in ref_leaves])
    ref.sum().backward()
    return (result.per_map.detach(), [leaf.grad for leaf in leaves]), (ref.detach(), [leaf.grad for leaf in ref_leaves])


def _check(got, expected, ignored=None):
    """Same losses; same gradients (finite everywhere), except on ignored pixels where autograd gives NaN."""
    (per_map, grads), (ref_per_map, ref_grads) = got, expected
    torch.testing.assert_close(per_map, ref_per_map.float(), rtol=1e-5, atol=1e-6, equal_nan=False)
    for grad, ref_grad in zip(grads, ref_grads):
        assert torch.isfinite(grad).all()
        if ignored is not None:  # (B, H, W): compare the counted pixels' gradients
            grad, ref_grad = (g.permute(0, 2, 3, 1)[~ignored.to(g.device)] for g in (grad, ref_grad))
        torch.testing.assert_close(grad, ref_grad.float(), rtol=1e-4, atol=1e-6)


def _inputs(seed=0, classes=3, ignore=False):
    gen = torch.Generator().manual_seed(seed)
    maps = [2 * torch.randn(2, classes, 5, 6, generator=gen) for _ in range(2)]
    target = torch.randint(0, classes, (2, 5, 6), generator=gen)
    if ignore:
        target[0, 1:3] = 255
    return maps, target


def test_minus_inf_in_a_class_other_than_the_target(loss_engine, device):
    maps, target = _inputs()
    t = int(target[0, 2, 3])
    maps[0][0, (t + 1) % 3, 2, 3] = -INF  # the issue's NaN on the kernels (0 * -inf)
    maps[1][1, (int(target[1, 0, 0]) + 2) % 3, 0, 0] = -INF
    got, expected = _both(maps, target, device)
    assert torch.isfinite(got[0]).all()
    _check(got, expected)


def test_the_issue_example_on_one_map(loss_engine, device):
    x = torch.zeros(1, 3, 2, 2, device=device)
    x[0, 2, 0, 0] = -INF
    per_map = LoMixLoss(1, 3)([x], torch.zeros(1, 2, 2, dtype=torch.long, device=device)).per_map
    assert per_map.item() == pytest.approx(0.8464, abs=1e-4)
    torch.testing.assert_close(
        per_map.cpu(),
        _reference(x.double(), torch.zeros(1, 2, 2, dtype=torch.long, device=device)).float().cpu().reshape(1),
    )


def test_a_whole_class_at_minus_inf(loss_engine, device):
    maps, target = _inputs(seed=1)
    target = target.clamp(max=1)  # class 2 is forbidden and never the target
    maps[0][:, 2] = -INF
    maps[1][:, 2] = -INF
    got, expected = _both(maps, target, device)
    assert torch.isfinite(got[0]).all()
    _check(got, expected)


def test_ignored_pixels_count_in_nothing_whatever_their_logits(loss_engine, device):
    maps, target = _inputs(seed=2, ignore=True)
    ignored = target == 255
    maps[0].permute(0, 2, 3, 1)[ignored] = -INF  # every class -inf: a NaN softmax there
    maps[1].permute(0, 2, 3, 1)[ignored] = float("nan")
    got, expected = _both(maps, target, device, ignore_index=255)
    assert torch.isfinite(got[0]).all()
    _check(got, expected, ignored)  # F.cross_entropy's own gradient is NaN on those pixels; ours is 0
    for grad in got[1]:
        assert torch.count_nonzero(grad.permute(0, 2, 3, 1)[ignored.to(grad.device)]) == 0
    # the same as if the ignored pixels held ordinary logits
    clean, _ = _inputs(seed=2, ignore=True)
    torch.testing.assert_close(_both(clean, target, device, ignore_index=255)[0][0], got[0], rtol=1e-5, atol=1e-6)


def test_minus_inf_in_the_target_class_is_an_infinite_loss(loss_engine, device):
    maps, target = _inputs(seed=3)
    maps[0][1, int(target[1, 4, 5]), 4, 5] = -INF
    got, expected = _both(maps, target, device)
    assert got[0][0] == INF and torch.isfinite(got[0][1])
    _check(got, expected)  # the reference agrees: +inf, and a finite gradient
