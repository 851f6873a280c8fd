"""CombinatorialMutation against plain loops written from the paper's equations."""

import math

import pytest
import torch
import torch.nn.functional as F

from lomix_lightning import CombinatorialMutation, LoMixLoss, enumerate_subsets, map_names
from lomix_lightning._engine import batched


@pytest.fixture(params=["loop", "per_size"])
def kernels(request, monkeypatch):
    """Both forms of the fusion kernels: the CPU's per-subset loops and the GPU's per-size gathers (forced here)."""
    if request.param == "per_size":
        monkeypatch.setattr(batched, "loops", lambda x: False)
    return request.param


def _outputs(b=2, c=3, sizes=(4, 8, 8), dtype=torch.float32, requires_grad=False):
    return [torch.randn(b, c, s, s, dtype=dtype, requires_grad=requires_grad) for s in sizes]


def _key(s):
    return "_".join(str(i + 1) for i in s)


def _reference(cmm, outputs):
    """Every map by a plain loop over subsets: Eqs. 1-5 written out with einsum, one subset at a time."""
    size = max(tuple(o.shape[-2:]) for o in outputs)
    maps = [
        F.interpolate(o, size=size, mode="bilinear", align_corners=False) if tuple(o.shape[-2:]) != size else o
        for o in outputs
    ]
    ref = {f"P{i + 1}": m for i, m in enumerate(maps)}
    for op in cmm.operators:
        for s in cmm.subsets:
            name = f"{op}({','.join(str(i + 1) for i in s)})"
            members = [maps[i] for i in s]
            if op == "add":
                out = members[0]
                for m in members[1:]:
                    out = out + m
            elif op == "mul":
                out = members[0]
                for m in members[1:]:
                    out = out * m
            elif op == "cat":
                conv = cmm.cat[_key(s)]
                w = conv.weight[:, :, 0, 0]  # (C, |S|*C)
                stacked = torch.cat(members, dim=1)  # (B, |S|*C, H, W)
                out = torch.einsum("ok,bkhw->bohw", w, stacked) + conv.bias[None, :, None, None]
            else:  # awf
                conv = cmm.awf[_key(s)]
                w = conv.weight[:, :, 0, 0]  # (|S|, |S|*C)
                scores = torch.einsum("ok,bkhw->bohw", w, torch.cat(members, dim=1)) + conv.bias[None, :, None, None]
                e = scores.exp()
                att = e / e.sum(dim=1, keepdim=True)
                out = sum(att[:, j : j + 1] * members[j] for j in range(len(s)))
            ref[name] = out
    return ref


@pytest.mark.parametrize("sizes", [(8, 8), (4, 8, 8), (2, 4, 8, 8), (2, 2, 4, 4, 8)])
def test_every_map_matches_plain_loop(sizes, kernels):
    cmm = CombinatorialMutation(len(sizes), 3)
    for p in cmm.parameters():  # non-trivial values, not the default init only
        torch.nn.init.normal_(p, std=0.5)
    outputs = _outputs(sizes=sizes)
    got, ref = cmm(outputs), _reference(cmm, outputs)
    assert list(got) == cmm.map_names == list(ref)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-5, atol=1e-5, msg=name)


def test_hand_worked_pixel():
    """One pixel, C=1, L=2: add = a + b, mul = a * b, cat = w1*a + w2*b + bias, awf = softmax(scores) . (a, b)."""
    cmm = CombinatorialMutation(2, 1)
    with torch.no_grad():
        cmm.cat["1_2"].weight.copy_(torch.tensor([2.0, -1.0]).view(1, 2, 1, 1))
        cmm.cat["1_2"].bias.fill_(0.5)
        cmm.awf["1_2"].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 0.0]]).view(2, 2, 1, 1))
        cmm.awf["1_2"].bias.zero_()
    a, b = torch.full((1, 1, 1, 1), 3.0), torch.full((1, 1, 1, 1), -2.0)
    got = {k: v.item() for k, v in cmm([a, b]).items()}
    assert got["add(1,2)"] == 1.0 and got["mul(1,2)"] == -6.0
    assert got["cat(1,2)"] == 2 * 3 - (-2) + 0.5  # 8.5
    # scores (3, 0): attention (e^3, 1) / (e^3 + 1)
    w1 = math.exp(3) / (math.exp(3) + 1)
    assert math.isclose(got["awf(1,2)"], w1 * 3 + (1 - w1) * -2, rel_tol=1e-6)


@pytest.mark.parametrize("num_outputs", [2, 3, 4, 5])
def test_map_count(num_outputs):
    cmm = CombinatorialMutation(num_outputs, 2)
    assert len(cmm.map_names) == num_outputs + 4 * (2**num_outputs - 1 - num_outputs)
    assert len(enumerate_subsets(num_outputs)) == 2**num_outputs - 1 - num_outputs
    assert len(set(cmm.map_names)) == len(cmm.map_names)


def test_names_and_order():
    names = map_names(4, ["add", "mul", "cat", "awf"])
    assert names[:4] == ["P1", "P2", "P3", "P4"]
    assert names[4:15] == [
        "add(1,2)", "add(1,3)", "add(1,4)", "add(2,3)", "add(2,4)", "add(3,4)",
        "add(1,2,3)", "add(1,2,4)", "add(1,3,4)", "add(2,3,4)", "add(1,2,3,4)",
    ]  # fmt: skip
    assert names[-1] == "awf(1,2,3,4)" and names[15] == "mul(1,2)" and names[26] == "cat(1,2)"
    assert map_names(3, ["awf", "add"])[3] == "awf(1,2)"  # operators keep the given order


def test_only_chosen_operators_create_parameters():
    assert not list(CombinatorialMutation(4, 3, ("add", "mul")).parameters())
    cat_only = CombinatorialMutation(4, 3, ("cat",))
    assert not hasattr(cat_only, "awf")
    # one |S|*C -> C conv with bias per subset
    expected = sum(len(s) * 3 * 3 + 3 for s in enumerate_subsets(4))
    assert sum(p.numel() for p in cat_only.parameters()) == expected
    awf_only = CombinatorialMutation(4, 3, ("awf",))
    expected_awf = sum(len(s) * (len(s) * 3) + len(s) for s in enumerate_subsets(4))
    assert sum(p.numel() for p in awf_only.parameters()) == expected_awf


def test_parameters_are_registered_not_recreated():
    cmm = CombinatorialMutation(3, 2)
    before = {k: v.clone() for k, v in cmm.state_dict().items()}
    outputs = _outputs(c=2, sizes=(4, 8, 8))
    a = cmm(outputs)
    b = cmm(outputs)
    for name in a:
        torch.testing.assert_close(a[name], b[name])  # deterministic: no conv re-sampled per call
    assert all(torch.equal(before[k], v) for k, v in cmm.state_dict().items())
    assert any(k.startswith("cat.") for k in before) and any(k.startswith("awf.") for k in before)


@pytest.mark.parametrize("op", ["cat", "awf"])
def test_subset_depends_only_on_members(op):
    cmm = CombinatorialMutation(4, 3, (op,))
    outputs = _outputs(sizes=(8, 8, 8, 8))
    base = cmm(outputs)
    changed = list(outputs)
    changed[2] = torch.randn_like(outputs[2])  # P3 changes
    after = cmm(changed)
    for name in cmm.map_names:
        if name.startswith(op):
            members = name[len(op) + 1 : -1].split(",")
            if "3" in members:
                assert not torch.allclose(base[name], after[name]), name
            else:
                torch.testing.assert_close(base[name], after[name], msg=name)


def test_awf_lies_between_member_min_and_max():
    cmm = CombinatorialMutation(4, 3, ("awf",))
    for p in cmm.parameters():
        torch.nn.init.normal_(p, std=2.0)
    outputs = _outputs(sizes=(8, 8, 8, 8))
    got = cmm(outputs)
    for s in cmm.subsets:
        name = f"awf({','.join(str(i + 1) for i in s)})"
        members = torch.stack([outputs[i] for i in s])
        assert (got[name] >= members.min(0).values - 1e-5).all()
        assert (got[name] <= members.max(0).values + 1e-5).all()


def test_every_parameter_gets_a_gradient():
    cmm = CombinatorialMutation(4, 3)
    outputs = _outputs(sizes=(2, 4, 8, 8), requires_grad=True)
    total = sum(m.square().mean() for m in cmm(outputs).values())
    total.backward()
    for name, p in cmm.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(o.grad is not None and o.grad.abs().sum() > 0 for o in outputs)


def test_upsampling_is_bilinear_to_largest():
    cmm = CombinatorialMutation(2, 1, ())
    small, big = torch.randn(1, 1, 3, 5), torch.randn(1, 1, 6, 10)
    got = cmm([small, big])
    assert got["P1"].shape == (1, 1, 6, 10)
    torch.testing.assert_close(got["P1"], F.interpolate(small, size=(6, 10), mode="bilinear", align_corners=False))
    torch.testing.assert_close(got["P2"], big)


def test_float16_inputs_fused_in_float32():
    cmm = CombinatorialMutation(4, 2, ("mul",))
    outputs = [torch.full((1, 2, 4, 4), 20.0, dtype=torch.float16) for _ in range(4)]
    got = cmm(outputs)
    assert got["mul(1,2,3,4)"].dtype == torch.float32
    assert torch.isfinite(got["mul(1,2,3,4)"]).all()  # 20^4 = 160000 would overflow float16
    assert math.isclose(got["mul(1,2,3,4)"][0, 0, 0, 0].item(), 160000.0)


def test_bad_inputs():
    cmm = CombinatorialMutation(3, 2)
    with pytest.raises(ValueError, match="expected 3 output maps"):
        cmm(_outputs(c=2, sizes=(4, 8)))
    with pytest.raises(ValueError, match="3 channels but num_classes=2"):
        cmm(_outputs(c=3, sizes=(4, 8, 8)))
    with pytest.raises(ValueError, match="different batch sizes"):
        cmm([torch.randn(2, 2, 4, 4), torch.randn(3, 2, 8, 8), torch.randn(2, 2, 8, 8)])
    with pytest.raises(TypeError, match="list or tuple"):
        cmm(torch.randn(2, 2, 8, 8))
    with pytest.raises(ValueError, match="shape \\(B, C, H, W\\)"):
        cmm([torch.randn(2, 2, 8), torch.randn(2, 2, 8, 8), torch.randn(2, 2, 8, 8)])
    with pytest.raises(ValueError, match="unknown operator 'sub'"):
        CombinatorialMutation(3, 2, ("add", "sub"))
    with pytest.raises(ValueError, match="must not repeat"):
        CombinatorialMutation(3, 2, ("add", "add"))
    with pytest.raises(TypeError, match="sequence of operator names"):
        CombinatorialMutation(3, 2, "add")
    with pytest.raises(ValueError, match="num_outputs must be an integer >= 1, got 0"):
        CombinatorialMutation(0, 2)


def test_warns_for_many_outputs():
    with pytest.warns(UserWarning, match="grows as 2\\^L"):
        CombinatorialMutation(7, 1, ("add",))


@pytest.mark.parametrize("op", ["add", "mul", "cat", "awf"])
def test_hand_written_backward_gradcheck(op, kernels):
    """Each operator's fused backward (prefix chains, block-sparse products, attention) against finite differences."""
    cmm = CombinatorialMutation(4, 2, operators=[op]).double()
    for p in cmm.parameters():
        torch.nn.init.normal_(p, std=0.5)
    stacked = torch.randn(2, 4, 2, 3, 3, dtype=torch.float64, requires_grad=True)  # (B, L, C, H, W)

    def fn(x, *params):
        return cmm.fuse(op, x)

    assert torch.autograd.gradcheck(fn, (stacked, *cmm.parameters()), eps=1e-6, atol=1e-6, fast_mode=True)


@pytest.mark.parametrize("memory_efficient", [False, True])
@pytest.mark.parametrize("ignore_index", [None, 3])
def test_gpu_form_gives_the_loss_and_gradients_of_the_cpu_form(monkeypatch, memory_efficient, ignore_index):
    """The whole PyTorch engine (fusion, CE + Dice, hand-written backward) in its GPU form (per-size kernels, merged
    passes; forced here on the CPU) and its CPU form (loops, one pass per group): same numbers."""
    torch.manual_seed(0)
    loss = LoMixLoss(4, 3, check_target=False, memory_efficient=memory_efficient, ignore_index=ignore_index).double()
    for p in loss.parameters():
        torch.nn.init.normal_(p, std=0.5)
    outputs = _outputs(sizes=(2, 4, 8, 8), dtype=torch.float64)
    target = torch.randint(0, 4 if ignore_index else 3, (2, 8, 8))

    def run():
        leaves = [o.clone().requires_grad_() for o in outputs]
        loss.zero_grad()
        total = loss(leaves, target).total
        total.backward()
        return total, [leaf.grad for leaf in leaves], [p.grad.clone() for p in loss.parameters()]

    monkeypatch.setenv("LOMIX_NATIVE", "0")
    expected = run()
    monkeypatch.setattr(batched, "loops", lambda x: False)
    torch.testing.assert_close(run(), expected)
