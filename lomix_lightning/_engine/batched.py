"""Batched fusion kernels: one operator's mutants for all subsets at once, with a hand-written backward.

:class:`~lomix_lightning._engine.plan.SubsetPlan` holds the index bookkeeping; :func:`fuse_forward` /
:func:`fuse_backward` are the pure, autograd-free kernels shared by :class:`~lomix_lightning.CombinatorialMutation`
and the fused CE + Dice engine (:mod:`lomix_lightning._engine`); :class:`FuseFunction` wraps them for autograd.
Each runs a few operators per subset size or per map, never one per subset (on a GPU each operator is a kernel
launch): ``add`` is one incidence matrix product, ``mul`` one gather-and-multiply per subset size, ``cat``/``awf`` run
their per-subset 1x1 convolutions as one block-sparse matrix product. They are tested against plain one-subset
definitions (``tests/test_mutation.py``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from lomix_lightning._engine import loop
from lomix_lightning._engine.plan import SubsetPlan
from lomix_lightning.losses.precision import full_precision


def fuse_forward(
    op: str, x: Tensor, out: Tensor, plan: SubsetPlan, weight: Tensor | None, bias: Tensor | None
) -> Tensor | None:
    """Write one operator's mutants of ``x`` (``(b, L, C, H, W)``) into ``out`` (``(b, K, C, H, W)``), no autograd.

    A few operators per operator, whatever ``K``: ``add`` is one ``(K, L)`` incidence product; ``mul`` one product
    per subset size (each subset's prefix, gathered from the previous size, times its last member); ``cat`` one
    block-sparse ``(K*C, L*C)`` matrix product; ``awf`` one ``(K*L, L*C)`` product for the scores (``-inf`` bias on
    non-members), one softmax over the ``L`` maps and ``L`` multiply-adds. Returns the awf attention
    ``(b, K, L, H*W)`` (what its backward needs), else ``None``.

    Args:
        op: The operator.
        x: ``(b, L, C, H, W)`` maps.
        out: ``(b, K, C, H, W)`` written.
        plan: The subset plan.
        weight: ``add``: the ``(L, K)`` incidence; ``mul``: :meth:`SubsetPlan.index_table`; ``cat``/``awf``: the
            dense weight of :meth:`~lomix_lightning.CombinatorialMutation.dense_parameters`.
        bias: ``cat``/``awf``: the dense bias; ``mul``: :meth:`SubsetPlan.member_incidence`.

    Example:
        >>> x = torch.arange(3.0).view(1, 3, 1, 1, 1)  # (b, L, C, H, W): maps holding 0, 1, 2
        >>> out = torch.empty(1, 4, 1, 1, 1)
        >>> incidence = torch.tensor([[1.0, 1, 0, 1], [1, 0, 1, 1], [0, 1, 1, 1]])  # (L, K) maps in subsets
        >>> fuse_forward("add", x, out, SubsetPlan.build(3), incidence, None)
        >>> out.flatten().tolist()  # (1,2), (1,3), (2,3), (1,2,3)
        [1.0, 2.0, 3.0, 3.0]
    """
    b, num_maps, c, h, w = x.shape
    xs, outs = x.view(b, num_maps, c, h * w), out.view(b, -1, c, h * w)
    if op == "add":  # every subset sum at once: (K, L) incidence @ (b, L, C*H*W)
        _into(out.view(b, out.shape[1], -1), torch.matmul, weight.t(), x.view(b, num_maps, -1))
        return None
    if op == "mul" and loops(x):
        loop.mul_forward(xs, outs, plan)
        return None
    if op == "mul":
        _, _, last, prefix = _tables(weight, plan)
        _into(outs, torch.index_select, xs, 1, last)  # every subset's last member at once
        previous = xs
        for block in plan.blocks:  # F_S = x_{S[-1]} * F_{S[:-1]}, the prefixes in the previous size's block
            k = slice(block.first, block.first + block.count)
            outs[:, k].mul_(previous.index_select(1, prefix[k]))
            previous = outs[:, k]
        return None
    if op == "cat":
        linear_scores(x, weight, bias, out=outs.view(b, -1, h * w))
        return None
    num_subsets = outs.shape[1]
    scores = linear_scores(x, weight, bias).view(b, num_subsets, num_maps, h * w)  # (b, K, L, HW)
    attention = torch.softmax(scores, dim=2)  # exactly 0 on the -inf scores of non-members
    if loops(x):
        loop.awf_forward(xs, attention, outs, plan)
        return attention
    for i in range(num_maps):  # out_S = sum_i a_{S,i} x_i
        if i == 0:
            _into(outs, torch.mul, attention[:, :, :1], xs[:, None, 0])
        else:
            outs.addcmul_(attention[:, :, i, None], xs[:, None, i])
    return attention


def fuse_backward(
    op: str,
    x: Tensor,
    fused: Tensor,
    aux: Tensor | None,
    grad: Tensor,
    grad_x: Tensor,
    plan: SubsetPlan,
    weight: Tensor | None,
    grad_params: list[Tensor] | None,
    bias: Tensor | None = None,
    accumulate: bool = True,
) -> None:
    """Accumulate the gradient of one operator's mutants into ``grad_x`` and ``grad_params``, no autograd.

    Args:
        op: The operator.
        x: ``(b, L, C, H, W)`` the maps the mutants were made of.
        fused: ``(b, K, C, H, W)`` the mutants (read by ``mul`` only).
        aux: What :func:`fuse_forward` returned.
        grad: ``(b, K, C, H, W)`` gradient of the mutants; ``mul``'s CPU loop overwrites it (scratch).
        grad_x: ``(b, L, C, H, W)`` accumulated in place.
        plan: The subset plan.
        weight: As in :func:`fuse_forward`.
        grad_params: ``[grad weight, grad bias]`` accumulated in place (``cat``/``awf``; ``None`` to skip).
        bias: As in :func:`fuse_forward` (read by ``mul`` only).
        accumulate: Add to ``grad_params`` (else replace its non-``None`` entries, placeholders, by new tensors).
    """
    b, num_maps, c, h, w = x.shape
    xs, gx, gs = x.view(b, num_maps, c, h * w), grad_x.view(b, num_maps, c, h * w), grad.view(b, -1, c, h * w)
    if op == "add":  # grad x_i = sum of grad over the subsets holding i: one (L, K) 0/1 matrix product
        grad_x.view(b, num_maps, -1).baddbmm_(weight.expand(b, -1, -1), grad.view(b, grad.shape[1], -1))
        return
    if op == "mul" and loops(x):
        loop.mul_backward(xs, fused.view(b, -1, c, h * w), gs, gx, plan)
        return
    if op == "mul":  # grad x_i += sum_{S holding i} grad_S * (product of S's other members), per size
        _, others, _, _ = _tables(weight, plan)
        fs, previous = fused.view(b, -1, c, h * w), xs
        for block in plan.blocks:
            rows = slice(block.row, block.row + block.count * block.size)
            k = slice(block.first, block.first + block.count)
            terms = previous.index_select(1, others[rows])  # (b, count * size, C, HW)
            terms.view(b, block.count, block.size, c * h * w).mul_(gs[:, k].reshape(b, block.count, 1, -1))
            incidence = bias[num_maps * block.row : num_maps * (block.row + block.count * block.size)]
            grad_x.view(b, num_maps, -1).baddbmm_(
                incidence.view(num_maps, -1).expand(b, -1, -1), terms.view(b, block.count * block.size, -1)
            )
            previous = fs[:, k]
        return
    if op == "cat":
        scores_grad = grad.view(b, -1, h * w)  # (b, K*C, HW)
    else:  # awf: out_S = sum_i a_{S,i} x_i
        attention = aux  # (b, K, L, HW)
        if loops(x):
            d_attention = loop.awf_backward(xs, attention, gs, gx, plan)
        else:
            d_attention = _awf_backward(xs, attention, gs, gx)
        scores_grad = torch._softmax_backward_data(d_attention, attention, 2, attention.dtype)
        scores_grad = scores_grad.view(b, -1, h * w)  # (b, K*L, HW); 0 on non-members
    linear_backward(x, weight, scores_grad, grad_x, grad_params, accumulate)


def _awf_backward(xs: Tensor, attention: Tensor, gs: Tensor, gx: Tensor) -> Tensor:
    """Awf backward through the members, per map: accumulate ``gx``, return ``d attention`` ``(b, K, L, HW)``."""
    d_attention = torch.empty_like(attention)
    for i in range(xs.shape[1]):  # d a_{S,i} = <grad_S, x_i> (also off the members: the softmax zeroes those)
        gx[:, i].add_((gs * attention[:, :, i, None]).sum(dim=1))  # not ``+=``: that copies the view back
        _into(d_attention[:, :, i], torch.sum, gs * xs[:, None, i], dim=2)
    return d_attention


def loops(x: Tensor) -> bool:
    """Whether to run the CPU forms: the per-subset loops of :mod:`lomix_lightning._engine.loop`, one pass per group.

    On the CPU (not compiling) the work is memory-bound and launches are cheap; elsewhere (GPU, ``meta``, compiled)
    the per-size kernels and merged passes, which launch few operators.
    """
    return x.device.type == "cpu" and not torch.compiler.is_compiling()


def _tables(table: Tensor, plan: SubsetPlan) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The views ``members, others, last members, prefixes`` of :meth:`SubsetPlan.index_table`."""
    rows, count = plan.num_rows, len(plan.subsets)
    return table[:rows], table[rows : 2 * rows], table[2 * rows : 2 * rows + count], table[2 * rows + count :]


def _into(out: Tensor, fn: Callable[..., Tensor], *args: Tensor, **kwargs: int) -> None:
    """``fn(*args, **kwargs, out=out)``; under ``torch.compile`` (no ``out=`` view with gaps) a copy into ``out``."""
    if torch.compiler.is_compiling():
        out.copy_(fn(*args, **kwargs))
    else:
        fn(*args, **kwargs, out=out)


def linear_scores(x: Tensor, weight: Tensor, bias: Tensor, out: Tensor | None = None) -> Tensor:
    """The block-sparse 1x1 convolution of ``cat``/``awf``: ``(b, rows, H*W) = weight @ x + bias``, no autograd.

    Args:
        x: ``(b, L, C, H, W)`` maps, read as their ``(b, L*C, H*W)`` concatenation.
        weight: ``(rows, L*C)``.
        bias: ``(rows,)``.
        out: Where to write the result.
    """
    b, num_maps, c, h, w = x.shape
    flat = x.view(b, num_maps * c, h * w)  # (b, L*C, HW)
    rows = weight.shape[0]
    if out is None:
        return torch.baddbmm(bias.view(1, rows, 1), weight.expand(b, -1, -1), flat)
    _into(out, torch.baddbmm, bias.view(1, rows, 1).expand(b, rows, h * w), weight.expand(b, -1, -1), flat)
    return out


def linear_backward(
    x: Tensor,
    weight: Tensor,
    scores_grad: Tensor,
    grad_x: Tensor,
    grad_params: list[Tensor] | None,
    accumulate: bool = True,
) -> None:
    """Backward of :func:`linear_scores` for ``scores_grad`` ``(b, rows, H*W)``, accumulated in place.

    ``grad_x`` is ``(b, L, C, H, W)``; ``grad_params`` is ``[grad weight, grad bias]`` (skipped if ``None``), added
    to if ``accumulate``, else its entries are replaced by new tensors.
    """
    b, num_maps, c, h, w = x.shape
    flat, grad_flat = x.view(b, num_maps * c, h * w), grad_x.view(b, num_maps * c, h * w)
    grad_flat.baddbmm_(weight.t().expand(b, -1, -1), scores_grad)
    if grad_params is not None and grad_params[0] is not None:
        if accumulate:
            grad_params[0] += torch.bmm(scores_grad, flat.transpose(1, 2)).sum(dim=0)
            grad_params[1] += scores_grad.sum(dim=(0, 2))
        else:  # the entries are placeholders, replaced by new tensors
            grad_params[0] = torch.bmm(scores_grad, flat.transpose(1, 2)).sum(dim=0)
            grad_params[1] = scores_grad.sum(dim=(0, 2))


class FuseFunction(torch.autograd.Function):
    """One operator's mutants ``(B, K, C, H, W)`` of ``(B, L, C, H, W)`` maps, with the hand-written backward."""

    @staticmethod
    def forward(ctx, op, plan, x, weight, bias):  # noqa: D102
        b, _, c, h, w = x.shape
        out = x.new_empty(b, len(plan.subsets), c, h, w)
        aux = fuse_forward(op, x, out, plan, weight, bias)
        ctx.op, ctx.plan = op, plan
        ctx.save_for_backward(x, weight, bias, out if op == "mul" else None, aux)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):  # noqa: D102
        x, weight, bias, fused, aux = ctx.saved_tensors
        grad_x = torch.zeros_like(x)
        grad_params = (
            [torch.zeros_like(weight), weight.new_zeros(weight.shape[0])] if ctx.op in ("cat", "awf") else None
        )
        with full_precision(x.device):
            grad = grad.clone() if ctx.op == "mul" else grad.contiguous()  # mul may use it as scratch
            fuse_backward(ctx.op, x, fused, aux, grad, grad_x, ctx.plan, weight, grad_params, bias)
        grad_weight, grad_bias = (None, None) if grad_params is None else grad_params
        return None, None, grad_x, grad_weight, grad_bias
