"""Batched fusion kernels: one operator's mutants for all subsets at once, with a hand-written backward.

:class:`SubsetPlan` holds the index bookkeeping; :func:`fuse_forward` / :func:`fuse_backward` are the pure,
autograd-free kernels shared by :class:`~lomix_lightning.CombinatorialMutation` and the fused CE + Dice engine
(:mod:`lomix_lightning.losses.engine`); :class:`FuseFunction` wraps them for autograd. ``add``/``mul`` reuse each
subset's prefix; ``cat``/``awf`` run their per-subset 1x1 convolutions as one block-sparse matrix product. The plain
one-subset definitions they are tested against are in :mod:`lomix_lightning.ops.fusion`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from lomix_lightning.ops.subsets import enumerate_subsets
from lomix_lightning.precision import full_precision


@dataclass(frozen=True)
class SubsetPlan:
    """Index bookkeeping shared by the fusion kernels.

    Attributes:
        subsets: The fused subsets, in ``itertools.combinations`` order (all pairs, then triples, ...).
        prefix: Per subset, the position of its prefix ``S[:-1]`` in ``subsets`` (``-1`` for pairs).
        rows: Per subset, its first row among the ``sum |S|`` awf scores.
        sizes: ``(first row, number of subsets, subset size)`` per subset size (awf softmax groups).

    Example:
        >>> plan = SubsetPlan.build(3)
        >>> plan.subsets, plan.prefix, plan.rows
        (((0, 1), (0, 2), (1, 2), (0, 1, 2)), (-1, -1, -1, 0), (0, 2, 4, 6))
    """

    subsets: tuple[tuple[int, ...], ...]
    prefix: tuple[int, ...]
    rows: tuple[int, ...]
    sizes: tuple[tuple[int, int, int], ...]

    @classmethod
    def build(cls, num_outputs: int) -> SubsetPlan:
        """The plan of every subset of ``num_outputs`` maps."""
        subsets = tuple(enumerate_subsets(num_outputs))
        position = {s: k for k, s in enumerate(subsets)}
        prefix = tuple(position.get(s[:-1], -1) for s in subsets)
        rows, sizes, row = [], [], 0
        for size in range(2, num_outputs + 1):
            count = sum(len(s) == size for s in subsets)
            sizes.append((row, count, size))
            rows.extend(row + size * j for j in range(count))
            row += size * count
        return cls(subsets, prefix, tuple(rows), tuple(sizes))


def fuse_forward(
    op: str, x: Tensor, out: Tensor, plan: SubsetPlan, weight: Tensor | None, bias: Tensor | None
) -> Tensor | None:
    """Write one operator's mutants of ``x`` (``(b, L, C, H, W)``) into ``out`` (``(b, K, C, H, W)``), no autograd.

    ``add``/``mul`` reuse each subset's prefix; ``cat`` and ``awf`` run one block-sparse ``(rows, L*C)`` matrix
    product over all subsets. Returns the awf attention ``(b, sum |S|, H*W)`` (what its backward needs), else ``None``.

    Example:
        >>> x = torch.arange(3.0).view(1, 3, 1, 1, 1)  # (b, L, C, H, W): maps holding 0, 1, 2
        >>> out = torch.empty(1, 4, 1, 1, 1)
        >>> fuse_forward("add", x, out, SubsetPlan.build(3), None, None)
        >>> out.flatten().tolist()  # (1,2), (1,3), (2,3), (1,2,3)
        [1.0, 2.0, 3.0, 3.0]
    """
    b, num_maps, c, h, w = x.shape
    xs, outs = x.view(b, num_maps, c, h * w), out.view(b, -1, c, h * w)
    if op == "add" and weight is not None:  # every subset sum at once: (K, L) incidence @ (b, L, C*H*W)
        torch.matmul(weight.t(), x.view(b, num_maps, -1), out=out.view(b, out.shape[1], -1))
        return None
    if op in ("add", "mul"):
        combine = torch.add if op == "add" else torch.mul
        for k, s in enumerate(plan.subsets):
            head = xs[:, s[0]] if plan.prefix[k] < 0 else outs[:, plan.prefix[k]]
            _into(outs[:, k], combine, head, xs[:, s[-1]])
        return None
    if op == "cat":
        linear_scores(x, weight, bias, out=outs.view(b, -1, h * w))
        return None
    attention = linear_scores(x, weight, bias)  # (b, sum |S|, HW) scores
    for row, count, size in plan.sizes:  # softmax over the members of each subset
        scores = attention[:, row : row + count * size].view(b, count, size, h * w)
        scores.copy_(scores.softmax(dim=2))
    for k, s in enumerate(plan.subsets):
        row = plan.rows[k]
        _into(outs[:, k], torch.mul, xs[:, s[0]], attention[:, row, None])
        for j, i in enumerate(s[1:], start=1):
            outs[:, k].addcmul_(xs[:, i], attention[:, row + j, None])
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
) -> None:
    """Accumulate the gradient of one operator's mutants into ``grad_x`` and ``grad_params``, no autograd.

    Args:
        op: The operator.
        x: ``(b, L, C, H, W)`` the maps the mutants were made of.
        fused: ``(b, K, C, H, W)`` the mutants (read by ``mul`` only).
        aux: What :func:`fuse_forward` returned.
        grad: ``(b, K, C, H, W)`` gradient of the mutants; ``mul`` overwrites it.
        grad_x: ``(b, L, C, H, W)`` accumulated in place.
        plan: The subset plan.
        weight: The ``cat``/``awf`` block-sparse weight; for ``add`` the ``(L, K)`` subset incidence.
        grad_params: ``[grad weight, grad bias]`` accumulated in place (``cat``/``awf``; ``None`` to skip).
    """
    b, num_maps, c, h, w = x.shape
    xs, gx, gs = x.view(b, num_maps, c, h * w), grad_x.view(b, num_maps, c, h * w), grad.view(b, -1, c, h * w)
    if op == "add":  # grad x_i = sum of grad over the subsets holding i: one (L, K) 0/1 matrix product
        grad_x.view(b, num_maps, -1).baddbmm_(weight.expand(b, -1, -1), grad.view(b, grad.shape[1], -1))
        return
    if op == "mul":  # F_S = F_prefix * x_last; reverse order sees every subset after all its extensions
        fs = fused.view(b, -1, c, h * w)
        for k in reversed(range(len(plan.subsets))):
            s, pre = plan.subsets[k], plan.prefix[k]
            head = xs[:, s[0]] if pre < 0 else fs[:, pre]
            gx[:, s[-1]].addcmul_(gs[:, k], head)
            (gx[:, s[0]] if pre < 0 else gs[:, pre]).addcmul_(gs[:, k], xs[:, s[-1]])
        return
    if op == "cat":
        scores_grad = grad.view(b, -1, h * w)  # (b, K*C, HW)
    else:
        attention = aux
        d_attention = torch.empty_like(attention)
        for k, s in enumerate(plan.subsets):
            row = plan.rows[k]
            for j, i in enumerate(s):
                _into(d_attention[:, row + j], torch.linalg.vecdot, gs[:, k], xs[:, i], dim=1)
                gx[:, i].addcmul_(gs[:, k], attention[:, row + j, None])
        scores_grad = torch.empty_like(attention)
        for row, count, size in plan.sizes:  # softmax backward per subset
            a = attention[:, row : row + count * size].view(b, count, size, h * w)
            da = d_attention[:, row : row + count * size].view(b, count, size, h * w)
            scores_grad[:, row : row + count * size] = (a * (da - (a * da).sum(dim=2, keepdim=True))).flatten(1, 2)
    linear_backward(x, weight, scores_grad, grad_x, grad_params)


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
    return torch.baddbmm(bias.view(1, rows, 1).expand(b, rows, h * w), weight.expand(b, -1, -1), flat, out=out)


def linear_backward(
    x: Tensor, weight: Tensor, scores_grad: Tensor, grad_x: Tensor, grad_params: list[Tensor] | None
) -> None:
    """Backward of :func:`linear_scores` for ``scores_grad`` ``(b, rows, H*W)``, accumulated in place.

    ``grad_x`` is ``(b, L, C, H, W)``; ``grad_params`` is ``[grad weight, grad bias]`` (skipped if ``None``).
    """
    b, num_maps, c, h, w = x.shape
    flat, grad_flat = x.view(b, num_maps * c, h * w), grad_x.view(b, num_maps * c, h * w)
    grad_flat.baddbmm_(weight.t().expand(b, -1, -1), scores_grad)
    if grad_params is not None and grad_params[0] is not None:
        grad_params[0] += torch.bmm(scores_grad, flat.transpose(1, 2)).sum(dim=0)
        grad_params[1] += scores_grad.sum(dim=(0, 2))


class FuseFunction(torch.autograd.Function):
    """One operator's mutants ``(B, K, C, H, W)`` of ``(B, L, C, H, W)`` maps, with the hand-written backward."""

    @staticmethod
    def forward(ctx, op, plan, x, weight, bias):  # noqa: D102
        b, _, c, h, w = x.shape
        out = x.new_empty(b, len(plan.subsets), c, h, w)
        aux = fuse_forward(op, x, out, plan, weight, bias)
        ctx.op, ctx.plan = op, plan
        ctx.save_for_backward(x, weight, out if op == "mul" else None, aux)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):  # noqa: D102
        x, weight, fused, aux = ctx.saved_tensors
        grad_x = torch.zeros_like(x)
        grad_params = (
            [torch.zeros_like(weight), weight.new_zeros(weight.shape[0])] if ctx.op in ("cat", "awf") else None
        )
        grad = grad.clone() if ctx.op == "mul" else grad.contiguous()  # mul accumulates into it
        with full_precision(x.device):
            fuse_backward(ctx.op, x, fused, aux, grad, grad_x, ctx.plan, weight, grad_params)
        grad_weight, grad_bias = (None, None) if grad_params is None else grad_params
        return None, None, grad_x, grad_weight, grad_bias
