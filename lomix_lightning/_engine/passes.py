"""The tensor-operation form of the fused CE + Dice engine: groups of maps scored in a few passes.

A *pass* is a run of consecutive groups (``"original"``, then operators) whose maps are written into one buffer and
scored by one softmax and one set of CE + Dice reductions, so the number of operators (on a GPU, kernel launches)
grows with the number of passes, not of groups. Wider passes mean fewer operators but bigger transient buffers:
:func:`pack_passes` bounds the width. A pass whose groups are all kept saves its softmax for backward; the others
are recomputed there.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from lomix_lightning._engine.batched import SubsetPlan, fuse_backward, fuse_forward
from lomix_lightning.losses.ce_dice import ce_dice_backward, ce_dice_forward, softmax

Workspace = Callable[..., Tensor]


def pack_passes(widths: Sequence[int], max_width: int) -> tuple[tuple[int, ...], ...]:
    """Consecutive groups packed greedily into passes of at most ``max_width`` maps (a wider group goes alone).

    Example:
        >>> pack_passes([4, 11, 11, 11, 11], 26)
        ((0, 1, 2), (3, 4))
        >>> pack_passes([4, 11, 11], 1)
        ((0,), (1,), (2,))
    """
    passes: list[list[int]] = []
    width = 0
    for g, w in enumerate(widths):
        if passes and width + w <= max_width:
            passes[-1].append(g)
            width += w
        else:
            passes.append([g])
            width = w
    return tuple(tuple(p) for p in passes)


def _width(op: str, num_maps: int, num_subsets: int) -> int:
    return num_maps if op == "original" else num_subsets


def write_pass(
    groups: Sequence[str],
    members: Sequence[int],
    x: Tensor,
    subsets: SubsetPlan,
    params: Sequence[Tensor | None],
    into: Tensor | None,
    workspace: Workspace,
) -> tuple[Tensor, list[Tensor | None]]:
    """The ``(b, W, C, H, W)`` maps of one pass (``x`` itself for the original group alone) and each group's extra."""
    b, num_maps, c, h, w = x.shape
    if len(members) == 1 and groups[members[0]] == "original":
        return x, [None]
    k = len(subsets.subsets)
    width = sum(_width(groups[g], num_maps, k) for g in members)
    buffer = workspace("fused", x, (b, width, c, h, w)) if into is None else into
    extras, start = [], 0
    for g in members:
        op = groups[g]
        part = buffer[:, start : start + _width(op, num_maps, k)]
        if op == "original":
            part.copy_(x)
            extras.append(None)
        else:
            extras.append(fuse_forward(op, x, part, subsets, params[2 * g - 2], params[2 * g - 1]))
        start += part.shape[1]
    return buffer, extras


def forward_passes(
    groups: Sequence[str],
    passes: Sequence[Sequence[int]],
    keep: Sequence[bool],
    x: Tensor,
    target: tuple[Tensor, Tensor | None, Tensor],
    subsets: SubsetPlan,
    params: Sequence[Tensor | None],
    kept: Sequence[Tensor | None],
    kept_fused: Sequence[Tensor | None],
    workspace: Workspace,
) -> tuple[Tensor, list[Tensor | None]]:
    """Statistics ``(M, 1 + 2C)`` of one chunk ``x``; fills the kept softmax (and fused) buffers of kept passes.

    Returns the statistics and, per group, its fusion extra if its pass is kept (awf attention), else ``None``.
    """
    stats, extras = [], []
    for n, members in enumerate(passes):
        keep_pass = all(keep[g] for g in members)
        fused, extra = write_pass(groups, members, x, subsets, params, kept_fused[n], workspace)
        out = kept[n] if keep_pass else workspace("softmax", fused)
        stats.append(ce_dice_forward(fused, *target, out=out)[1])
        extras += extra if keep_pass else [None] * len(members)
        del fused, out  # free this pass's buffers before the next pass allocates its own
    return torch.cat(stats) if len(stats) > 1 else stats[0], extras


def backward_passes(
    groups: Sequence[str],
    passes: Sequence[Sequence[int]],
    keep: Sequence[bool],
    x: Tensor,
    target: tuple[Tensor, Tensor | None],
    subsets: SubsetPlan,
    params: Sequence[Tensor | None],
    grad: Tensor,
    grad_x: Tensor,
    grad_params: list[Tensor | None],
    kept: Sequence[Tensor | None],
    kept_fused: Sequence[Tensor | None],
    extras: Sequence[Tensor | None],
    workspace: Workspace,
    first: bool = False,
) -> None:
    """Write ``grad_x`` and accumulate into ``grad_params`` (or, with ``first``, replace its placeholders).

    With ``first`` (the first chunk) the non-``None`` entries of ``grad_params`` are placeholders, replaced by new
    tensors. The original group, at the head of the first pass, writes every element of ``grad_x``; the operators
    add to it.
    """
    b, num_maps, c, h, w = x.shape
    k, row = len(subsets.subsets), 0
    for n, members in enumerate(passes):
        keep_pass = all(keep[g] for g in members)
        if keep_pass:
            fused, extra = (x if kept_fused[n] is None else kept_fused[n]), [extras[g] for g in members]
        else:
            fused, extra = write_pass(groups, members, x, subsets, params, None, workspace)
        width = sum(_width(groups[g], num_maps, k) for g in members)
        rows, row = grad[row : row + width], row + width
        alone = len(members) == 1 and groups[members[0]] == "original"
        out = grad_x if alone and n == 0 else workspace("grad", x, (b, width, c, h, w))
        p = kept[n] if keep_pass else softmax(fused, out=workspace("softmax", fused))
        ce_dice_backward(p, rows, *target, out=out)
        p = None  # the softmax is no longer needed: free it before the fusion backward
        start = 0
        for g, aux in zip(members, extra):
            op = groups[g]
            size = _width(op, num_maps, k)
            part, grad_part = fused[:, start : start + size], out[:, start : start + size]
            start += size
            if op == "original":
                if out is not grad_x:
                    grad_x.copy_(grad_part)
                continue
            weight, bias = params[2 * g - 2], params[2 * g - 1]
            grads = grad_params[2 * g - 2 : 2 * g]
            fuse_backward(op, x, part, aux, grad_part, grad_x, subsets, weight, grads, bias, accumulate=not first)
            grad_params[2 * g - 2 : 2 * g] = grads  # with ``first``, the new tensors
        del fused, p, out, part, grad_part, extra  # free this pass's buffers before the next pass allocates its own
