"""Property-based tests (hypothesis) of the loss engine: any valid B, C, L in 1..5 and mixed output resolutions."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from lomix_lightning import OPERATORS, LoMixLoss

SCHEMES = ["last_layer", "deep_supervision", "mutation", "lomix"]


@st.composite
def loss_inputs(draw):
    """A LoMixLoss configuration and a matching batch: L maps at mixed resolutions, coarse to fine, and labels."""
    batch, classes, num_outputs = (draw(st.integers(1, 5), label=name) for name in ("B", "C", "L"))
    scheme = draw(st.sampled_from(SCHEMES), label="scheme")
    operators = None
    if scheme != "last_layer" and draw(st.booleans(), label="override operators"):
        operators = draw(st.lists(st.sampled_from(OPERATORS), unique=True, max_size=4), label="operators")
    weighting = draw(st.sampled_from([None, "learned", "fixed"]), label="weighting")
    ignore_index = 255 if classes > 1 and draw(st.booleans(), label="ignore") else None
    # spatial sizes: a common aspect ratio, each map 1x to 8x a base side, the largest one last or anywhere
    base, aspect = draw(st.integers(1, 3), label="base"), draw(st.sampled_from([1, 2]), label="aspect")
    scales = draw(st.lists(st.sampled_from([1, 2, 4, 8]), min_size=num_outputs, max_size=num_outputs), label="scales")
    sizes = [(base * s, base * s * aspect) for s in scales]
    scale = draw(st.floats(0.0, 20.0), label="logit scale")
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16]), label="dtype")
    seed = draw(st.integers(0, 2**16), label="seed")
    return {
        "B": batch, "C": classes, "L": num_outputs, "scheme": scheme, "operators": operators,
        "weighting": weighting, "ignore_index": ignore_index, "sizes": sizes, "scale": scale, "dtype": dtype,
        "seed": seed,
    }  # fmt: skip


def _operators(case) -> list[str]:
    if case["scheme"] == "last_layer":
        return []
    if case["operators"] is not None:
        return case["operators"]
    return {"deep_supervision": [], "mutation": ["add"], "lomix": list(OPERATORS)}[case["scheme"]]


def _expected_num_maps(case) -> int:
    """Independent count: the originals (only P_L for last_layer) plus one map per operator per subset |S| >= 2."""
    if case["scheme"] == "last_layer":
        return 1
    operators, num_outputs = _operators(case), case["L"]
    subsets = sum(math.comb(num_outputs, k) for k in range(2, num_outputs + 1))
    return num_outputs + len(operators) * subsets


@settings(max_examples=80, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=loss_inputs())
def test_loss_engine_is_total_finite_and_counts_maps(case):
    assume(case["L"] > 1 or not _operators(case))  # L = 1 with operators: see the test below
    generator = torch.Generator().manual_seed(case["seed"])
    classes = case["C"]
    loss = LoMixLoss(
        case["L"],
        classes,
        scheme=case["scheme"],
        operators=case["operators"],
        weighting=case["weighting"],
        loss="ce_dice" if classes > 1 else "structure",
        ignore_index=case["ignore_index"],
    )
    outputs = [
        (torch.randn(case["B"], classes, h, w, generator=generator) * case["scale"]).to(case["dtype"]).requires_grad_()
        for h, w in case["sizes"]
    ]
    height, width = max(case["sizes"])
    target = torch.randint(0, max(classes, 2), (case["B"], height, width), generator=generator)
    if case["ignore_index"] is not None:
        target[0, 0, 0] = case["ignore_index"]

    result = loss(outputs, target)

    expected = _expected_num_maps(case)
    assert loss.num_maps == len(loss.map_names) == expected
    assert result.per_map.shape == result.weights.shape == (expected,)
    assert torch.isfinite(result.per_map).all() and torch.isfinite(result.total)
    assert result.total.dtype == torch.promote_types(case["dtype"], torch.float32)  # never below float32
    torch.testing.assert_close(result.total, (result.weights * result.per_map).sum(), rtol=1e-5, atol=1e-5)
    result.total.backward()
    for i, out in enumerate(outputs):
        assert out.grad is not None and torch.isfinite(out.grad).all(), f"P{i + 1}"
    for name, parameter in loss.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name


@pytest.mark.parametrize("operator", OPERATORS)
def test_one_output_with_an_operator_supervises_p1_alone(operator):
    """With L = 1 no subset has two maps, so an operator adds no mutant (as the default scheme does with one output):
    the loss is P1's CE + Dice, not an error (the module refuses single-map networks for multi-map schemes itself)."""
    loss = LoMixLoss(1, 3, scheme="deep_supervision", operators=[operator])
    output = torch.randn(2, 3, 4, 4, requires_grad=True)
    target = torch.randint(0, 3, (2, 4, 4))
    result = loss([output], target)
    assert loss.map_names == ["P1"] and result.per_map.shape == (1,)
    p, y = output.softmax(dim=1), F.one_hot(target, 3).permute(0, 3, 1, 2).float()
    dice = 1 - ((2 * (p * y).sum((0, 2, 3)) + 1e-5) / ((p * p).sum((0, 2, 3)) + y.sum((0, 2, 3)) + 1e-5)).mean()
    torch.testing.assert_close(result.total, 0.3 * F.cross_entropy(output, target) + 0.7 * dice)
    result.total.backward()
    assert torch.isfinite(output.grad).all() and output.grad.abs().sum() > 0
