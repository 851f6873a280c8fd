"""LoMixLoss(memory_efficient=...): recomputing in backward gives the same loss and gradients as keeping the softmax."""

import pytest
import torch
import torch.nn.functional as F

import lomix_lightning._engine.native as native
from lomix_lightning import LoMixLoss, LoMixSegmentationModule
from lomix_lightning.models import UNet


@pytest.fixture(autouse=True)
def _pytorch_engine(monkeypatch):
    """``memory_efficient`` only changes the PyTorch engine (the CPU kernels keep nothing either way): pin it here,
    or every comparison below would compare the kernels with themselves."""
    monkeypatch.setenv("LOMIX_NATIVE", "0")
    assert native.engine(torch.device("cpu"), torch.float32, 3, 4) == "pytorch: LOMIX_NATIVE=0"


def _setup(scheme="lomix", num_classes=3, ignore_index=None, dtype=torch.float32, seed=0, device="cpu"):
    torch.manual_seed(seed)
    outputs = [torch.randn(3, num_classes, s, s, dtype=dtype).to(device) for s in (4, 8, 16, 16)]
    high = num_classes + (1 if ignore_index is not None else 0)
    target = torch.randint(0, high, (3, 16, 16))
    if ignore_index is not None:
        target[target == num_classes] = ignore_index
    return outputs, target.to(device)


def _run(loss, outputs, target):
    """Total, per-map losses and the gradients of the outputs and of every loss parameter."""
    leaves = [o.clone().requires_grad_() for o in outputs]
    result = loss(leaves, target)
    loss.zero_grad()
    result.total.backward()
    grads = [leaf.grad for leaf in leaves] + [p.grad.clone() for p in loss.parameters()]
    return result.total.detach(), result.per_map.detach(), grads


def _twins(**kwargs):
    """The same loss (same parameters) with the softmax kept and with recomputation."""
    keep = LoMixLoss(4, kwargs.pop("num_classes", 3), memory_efficient=False, **kwargs)
    for p in keep.parameters():  # non-trivial fusion weights and loss weights
        torch.nn.init.normal_(p, std=0.5)
    lean = LoMixLoss(keep.num_outputs, keep.num_classes, memory_efficient=True, **kwargs)
    lean.load_state_dict(keep.state_dict())
    return keep, lean


@pytest.mark.parametrize("scheme", ["last_layer", "deep_supervision", "mutation", "lomix"])
@pytest.mark.parametrize("ignore_index", [None, 255])
def test_same_total_and_gradients(scheme, ignore_index, device):
    keep, lean = (loss.to(device) for loss in _twins(scheme=scheme, ignore_index=ignore_index))
    outputs, target = _setup(ignore_index=ignore_index, device=device)
    total_keep, per_map_keep, grads_keep = _run(keep, outputs, target)
    total_lean, per_map_lean, grads_lean = _run(lean, outputs, target)
    torch.testing.assert_close(total_lean, total_keep, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(per_map_lean, per_map_keep, rtol=1e-5, atol=1e-6)
    assert len(grads_keep) == len(grads_lean)
    for got, expected in zip(grads_lean, grads_keep):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


def test_recompute_against_plain_autograd(device):
    """Gradients of the recomputing engine against autograd through a plain loop over the fused maps."""
    lean = _twins()[1].to(device)
    outputs, target = _setup(device=device)
    total, _, grads = _run(lean, outputs, target)
    leaves = [o.clone().requires_grad_() for o in outputs]
    maps = lean.mutation(leaves)
    lean.zero_grad()
    reference = 0.0
    for name, weight in zip(lean.map_names, lean.weights()):
        p, y = maps[name].softmax(dim=1), F.one_hot(target, 3).permute(0, 3, 1, 2).float()
        dice = 1 - ((2 * (p * y).sum((0, 2, 3)) + 1e-5) / ((p * p).sum((0, 2, 3)) + y.sum((0, 2, 3)) + 1e-5)).mean()
        reference = reference + weight * (0.3 * F.cross_entropy(maps[name], target) + 0.7 * dice)
    reference.backward()
    torch.testing.assert_close(total, reference.detach(), rtol=1e-5, atol=1e-5)
    expected = [leaf.grad for leaf in leaves] + [p.grad for p in lean.parameters()]
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_gradcheck_float64_recompute():
    loss = LoMixLoss(3, 2, memory_efficient=True, ignore_index=9).double()
    outputs = tuple(torch.randn(2, 2, s, s, dtype=torch.float64, requires_grad=True) for s in (2, 4, 4))
    target = torch.randint(0, 2, (2, 4, 4))
    target[0, 0, 0] = 9

    def fn(a, b, c, *params):
        return loss([a, b, c], target).total

    assert torch.autograd.gradcheck(fn, (*outputs, *loss.parameters()), eps=1e-6, atol=1e-5, fast_mode=True)


@pytest.mark.parametrize("memory_efficient", [False, True])
def test_backward_twice_with_retained_graph(memory_efficient):
    loss = LoMixLoss(4, 3, memory_efficient=memory_efficient)
    outputs, target = _setup()
    leaves = [o.clone().requires_grad_() for o in outputs]
    total = loss(leaves, target).total
    total.backward(retain_graph=True)
    first = [leaf.grad.clone() for leaf in leaves]
    total.backward()
    for leaf, grad in zip(leaves, first):
        torch.testing.assert_close(leaf.grad, 2 * grad)


def test_no_grad_and_inference_mode_give_the_same_total(device):
    keep, lean = (loss.to(device) for loss in _twins())
    outputs, target = _setup(device=device)
    expected = keep(outputs, target).total.detach()
    with torch.no_grad():
        torch.testing.assert_close(lean(outputs, target).total, expected)
    with torch.inference_mode():
        torch.testing.assert_close(lean(outputs, target).total, expected)
    torch.testing.assert_close(lean(outputs, target).total.detach(), expected)  # buffers reused after inference


def test_bf16_autocast_both_modes_agree():
    keep, lean = _twins()
    outputs, target = _setup()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = [o.to(torch.bfloat16) for o in outputs]
        a, b = keep(half, target).total, lean(half, target).total
    assert a.dtype == b.dtype == torch.float32
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("loss_name", ["structure", "callable"])
def test_other_losses_use_checkpoint_with_same_gradients(loss_name):
    def l1(logits, target):
        return (logits.softmax(1) - F.one_hot(target.long(), 2).permute(0, 3, 1, 2)).abs().mean()

    num_classes = 1 if loss_name == "structure" else 2
    loss = "structure" if loss_name == "structure" else l1
    keep, lean = _twins(num_classes=num_classes, loss=loss)
    torch.manual_seed(1)
    outputs = [torch.randn(2, num_classes, s, s) for s in (8, 16, 32, 32)]
    target = (torch.rand(2, 32, 32) > 0.5).long()
    total_keep, _, grads_keep = _run(keep, outputs, target)
    total_lean, _, grads_lean = _run(lean, outputs, target)
    torch.testing.assert_close(total_lean, total_keep)
    for got, expected in zip(grads_lean, grads_keep):
        torch.testing.assert_close(got, expected)


def test_bad_value_and_module_passthrough():
    with pytest.raises(TypeError, match="memory_efficient must be True or False, got 'yes'"):
        LoMixLoss(2, 3, memory_efficient="yes")
    net = UNet(in_channels=1, num_classes=3, base_channels=4, depth=3)
    module = LoMixSegmentationModule(net, 3, memory_efficient=True)
    assert module.criterion.memory_efficient is True
    assert module.hparams.memory_efficient is True
    assert LoMixSegmentationModule(net, 3).criterion.memory_efficient is False
