"""``torch.compile(fullgraph=True)`` of LoMixLoss: one graph (no graph break), same values and gradients as eager."""

import pytest
import torch

from lomix_lightning import LoMixLoss


def _inputs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    maps = [torch.randn(2, 3, s, s, generator=gen, requires_grad=True) for s in (4, 8, 16)]
    return maps, torch.randint(0, 3, (2, 16, 16), generator=gen)


def _compare(loss, backend):
    compiled = torch.compile(loss, fullgraph=True, backend=backend)  # fullgraph: a graph break raises
    maps, target = _inputs()
    out = compiled(maps, target)
    out.total.backward()
    grads = [m.grad.clone() for m in maps] + [p.grad.clone() for p in loss.parameters()]
    loss.zero_grad()
    maps_eager = [m.detach().clone().requires_grad_() for m in maps]
    ref = loss(maps_eager, target)
    ref.total.backward()
    torch.testing.assert_close(out.per_map, ref.per_map, rtol=1e-5, atol=1e-6)
    expected = [m.grad for m in maps_eager] + [p.grad for p in loss.parameters()]
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("memory_efficient", [False, True])
def test_lomix_loss_compiles_to_one_graph(memory_efficient):
    torch._dynamo.reset()
    loss = LoMixLoss(3, 3, memory_efficient=memory_efficient)  # check_target on: a device-side assertion in graph
    _compare(loss, "aot_eager")  # dynamo + AOT autograd (forward and backward graphs), no code generation


@pytest.mark.slow
def test_lomix_loss_compiles_with_inductor():
    torch._dynamo.reset()
    _compare(LoMixLoss(3, 3), "inductor")


def test_compiled_label_check_still_fails_on_a_bad_label():
    torch._dynamo.reset()
    compiled = torch.compile(LoMixLoss(3, 3), fullgraph=True, backend="aot_eager")
    maps, target = _inputs()
    target[0, 0, 0] = 7
    with pytest.raises(RuntimeError, match=r"target holds labels outside \[0, 3\)"):
        compiled(maps, target)
