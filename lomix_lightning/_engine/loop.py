"""The CPU form of the ``mul`` and ``awf`` fusion kernels: one in-place operator per subset or member, no gathers.

On the CPU an operator costs microseconds to launch and the work is memory-bound, so the per-subset loop (each
product reusing its prefix's, written in place) is faster than the per-size gathers of
:mod:`lomix_lightning._engine.batched`, which a GPU prefers (few kernel launches). Same layouts and results; the tests
compare both with plain one-subset definitions (``tests/test_mutation.py``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from lomix_lightning._engine.plan import SubsetPlan


def mul_forward(xs: Tensor, outs: Tensor, plan: SubsetPlan) -> None:
    """``outs`` ``(b, K, C, HW)`` = the product of each subset's maps of ``xs`` ``(b, L, C, HW)``, prefix reused.

    Example:
        >>> outs = torch.empty(1, 4, 1, 1)
        >>> mul_forward(torch.tensor([2.0, 3.0, 5.0]).view(1, 3, 1, 1), outs, SubsetPlan.build(3))
        >>> outs.flatten().tolist()  # (1,2), (1,3), (2,3), (1,2,3)
        [6.0, 10.0, 15.0, 30.0]
    """
    for k, s in enumerate(plan.subsets):
        head = xs[:, s[0]] if plan.prefix[k] < 0 else outs[:, plan.prefix[k]]
        torch.mul(head, xs[:, s[-1]], out=outs[:, k])


def mul_backward(xs: Tensor, fs: Tensor, gs: Tensor, gx: Tensor, plan: SubsetPlan) -> None:
    """Accumulate into ``gx`` the gradient ``gs`` of the products ``fs`` (``gs`` is used as scratch: overwritten)."""
    for k in reversed(range(len(plan.subsets))):  # every subset is seen after all its extensions
        s, pre = plan.subsets[k], plan.prefix[k]
        head = xs[:, s[0]] if pre < 0 else fs[:, pre]
        gx[:, s[-1]].addcmul_(gs[:, k], head)
        (gx[:, s[0]] if pre < 0 else gs[:, pre]).addcmul_(gs[:, k], xs[:, s[-1]])


def awf_forward(xs: Tensor, attention: Tensor, outs: Tensor, plan: SubsetPlan) -> None:
    """``outs[:, k] = sum_i attention[:, k, i] * xs[:, i]`` over the members ``i`` of subset ``k``.

    Example:
        >>> attention = torch.tensor([0.25, 0.75, 0.0]).view(1, 1, 3, 1)  # (b, K, L, HW): subset (1, 2) of 3
        >>> outs = torch.empty(1, 1, 1, 1)
        >>> awf_forward(torch.tensor([4.0, 8.0, 1.0]).view(1, 3, 1, 1), attention, outs, SubsetPlan.build(2))
        >>> outs.item()
        7.0
    """
    for k, s in enumerate(plan.subsets):
        torch.mul(xs[:, s[0]], attention[:, k, s[0], None], out=outs[:, k])
        for i in s[1:]:
            outs[:, k].addcmul_(xs[:, i], attention[:, k, i, None])


def awf_backward(xs: Tensor, attention: Tensor, gs: Tensor, gx: Tensor, plan: SubsetPlan) -> Tensor:
    """Accumulate into ``gx`` the gradient through the members; return ``d attention`` ``(b, K, L, HW)`` (0 off)."""
    d_attention = torch.zeros_like(attention)
    for k, s in enumerate(plan.subsets):
        for i in s:
            torch.linalg.vecdot(gs[:, k], xs[:, i], dim=1, out=d_attention[:, k, i])
            gx[:, i].addcmul_(gs[:, k], attention[:, k, i, None])
    return d_attention
