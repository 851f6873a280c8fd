"""The fused CE + Dice engine of :class:`~lomix_lightning.LoMixLoss`: fusion and loss of every map in one pass.

Each operator writes all its mutants into one reused buffer, one softmax serves CE and Dice, and only sums leave the
forward (the ``(M, 1 + 2C)`` statistics of :func:`~lomix_lightning.losses.ce_dice.ce_dice_stats`). The backward is
written by hand: it keeps the softmax of a few groups and recomputes the rest chunk by chunk, which bounds memory.
"""

from __future__ import annotations

import functools
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from lomix_lightning._engine import batched
from lomix_lightning._engine.native import (
    GroupLayout,
    GroupSpec,
    groups_grad,
    groups_stats,
    identity_layout,
    subset_layout,
    usable,
)
from lomix_lightning._engine.passes import backward_passes, forward_passes, pack_passes
from lomix_lightning._engine.plan import SubsetPlan
from lomix_lightning.losses.ce_dice import CEDiceTarget
from lomix_lightning.losses.precision import full_precision

if TYPE_CHECKING:
    from lomix_lightning.losses.mutation import CombinatorialMutation


def lomix_ce_dice_stats(
    stacked: Tensor,
    operators: Sequence[str],
    mutation: CombinatorialMutation,
    prepared: CEDiceTarget,
    memory_efficient: bool = False,
) -> Tensor:
    """CE + Dice statistics of the original maps and of every operator's mutants, differentiable.

    Args:
        stacked: ``(B, L, C, H, W)`` the original maps.
        operators: Operators whose mutants to score, in map order (may be empty).
        mutation: The module holding the subsets and the ``cat``/``awf`` convolutions.
        prepared: The target, from :func:`~lomix_lightning.losses.ce_dice.ce_dice_target`.
        memory_efficient: Keep only ``stacked`` for backward and recompute everything there, in chunks of images of at
            most 48 MiB of mutants per operator.

    Returns:
        ``(L + K * len(operators), 1 + 2C)`` statistics, originals first (see
        :func:`~lomix_lightning.losses.ce_dice.ce_dice_from_stats`).

    Example:
        >>> from lomix_lightning.losses.ce_dice import ce_dice_stats, ce_dice_target
        >>> x = torch.randn(2, 2, 3, 4, 4)  # (B, L, C, H, W)
        >>> prepared = ce_dice_target(torch.randint(0, 3, (2, 4, 4)), 3, torch.float32)
        >>> stats = lomix_ce_dice_stats(x, ["mul"], CombinatorialMutation(2, 3, ["mul"]), prepared)
        >>> torch.allclose(stats[2], ce_dice_stats(x.prod(1, keepdim=True), prepared)[0], atol=1e-5)
        True
    """
    groups = ("original", *operators)
    if not torch.compiler.is_compiling() and usable(stacked):  # the kernels keep nothing, take the whole batch
        layouts = _kernel_layouts(mutation.plan.subsets, stacked.shape[1], stacked.shape[2], groups)
        params = [p for op in operators for p in mutation.packed_parameters(op, stacked.dtype)]
        plan = _EnginePlan(groups, mutation.plan, prepared, stacked.shape[0], (False,) * len(groups), layouts)
        block = None
    else:
        keep = tuple(not memory_efficient and op in _KEPT for op in groups)
        passes = _passes(stacked, groups, len(mutation.subsets), memory_efficient)
        width = max(
            sum(stacked.shape[1] if groups[g] == "original" else len(mutation.subsets) for g in p) for p in passes
        )
        chunk = _chunk_size(stacked, width, memory_efficient)
        dense = _dense_slices(mutation, groups)  # cat/awf: views of one block, built by two operators
        block = mutation.dense_block(stacked.dtype) if any(g is not None for g, *_ in dense) else None
        params = [
            p
            for op in operators
            for p in ((None, None) if op in _DENSE else mutation.dense_parameters(op, stacked.dtype))
        ]
        plan = _EnginePlan(groups, mutation.plan, prepared, chunk, keep, passes=passes, dense=dense)
    return _LoMixStats.apply(plan, stacked.contiguous(), block, *params)


_DENSE = ("cat", "awf")


def _dense_slices(
    mutation: CombinatorialMutation, groups: Sequence[str]
) -> tuple[tuple[int | None, int, int, int], ...]:
    """Per operator of :meth:`CombinatorialMutation.dense_block`: ``(group or None, start, rows, L*C)``.

    The operator's ``(rows, L*C)`` dense weight starts at ``start`` in the block, its ``(rows,)`` bias follows.
    """
    num_in, start, slices = mutation.num_outputs * mutation.num_classes, 0, []
    for op in mutation.dense_operators:
        rows = len(mutation.subsets) * (mutation.num_classes if op == "cat" else mutation.num_outputs)
        slices.append((groups.index(op) if op in groups else None, start, rows, num_in))
        start += rows * (num_in + 1)
    return tuple(slices)


def _with_dense(plan: _EnginePlan, block: Tensor | None, params: Sequence[Tensor | None]) -> list[Tensor | None]:
    """``params`` with the ``cat``/``awf`` slots filled by their views of the dense block."""
    params = list(params)
    for g, start, rows, num_in in plan.dense:
        if g is not None:
            weight = block[start : start + rows * num_in].view(rows, num_in)  # (rows, L*C)
            params[2 * g - 2 : 2 * g] = [weight, block[start + rows * num_in : start + rows * (num_in + 1)]]
    return params


def _dense_grad(plan: _EnginePlan, grad_params: Sequence[Tensor | None], like: Tensor) -> Tensor | None:
    """The gradient of the dense block from its operators' weight and bias gradients (one concatenation)."""
    parts = []
    for g, _, rows, num_in in plan.dense:
        if g is None:  # an operator this call does not score
            parts.append(like.new_zeros(rows * (num_in + 1)))
        elif grad_params[2 * g - 2] is None:
            return None
        else:
            parts += [grad_params[2 * g - 2].reshape(-1), grad_params[2 * g - 1]]
    return torch.cat(parts)


@functools.lru_cache(maxsize=64)
def _kernel_layouts(
    subsets: tuple[tuple[int, ...], ...], num_maps: int, num_classes: int, groups: tuple[str, ...]
) -> tuple[GroupLayout, ...]:
    """Per group, the kernels' layout (built once per configuration, not on every step)."""
    return tuple(
        identity_layout(num_maps)
        if op == "original"
        else subset_layout(subsets, num_classes, op if op in ("cat", "awf") else "none")
        for op in groups
    )


_CHUNK_BYTES = 48 * 2**20
"""Size of one operator's mutants for a chunk of images on the CPU or with ``memory_efficient`` (the reused buffers
are about three of these)."""

_KEPT = ("original", "cat")
"""Groups whose softmax the default engine keeps for backward (the others are recomputed, to bound memory)."""


@dataclass(frozen=True)
class _EnginePlan:
    """What :class:`_LoMixStats` computes: operator groups (``"original"`` first), target, chunking, kept groups.

    ``native``: per group (in ``groups`` order), the layout of the compiled CPU kernels
    (:mod:`lomix_lightning._engine.native`), which then fuse and score the maps with the packed ``cat``/``awf``
    parameters; ``None``: tensor operations.
    """

    groups: tuple[str, ...]
    subsets: SubsetPlan
    prepared: CEDiceTarget
    chunk: int
    keep: tuple[bool, ...]
    native: tuple[GroupLayout, ...] | None = None
    passes: tuple[tuple[int, ...], ...] = ()
    dense: tuple[tuple[int | None, int, int, int], ...] = ()


class _LoMixStats(torch.autograd.Function):
    """CE + Dice statistics ``(M, 1 + 2C)`` of the original maps and all mutants, fusion and loss fused.

    The batch is processed ``plan.chunk`` images at a time, each operator's mutants written into one reused
    buffer. For the groups in ``plan.keep`` the softmax (and the ``awf`` attention) is kept for backward; the other
    groups' mutants and softmax are recomputed there, chunk by chunk. With ``plan.native`` the compiled kernels fuse
    each group's fusion, softmax, CE and Dice per pixel block (no map is stored) and backward recomputes everything.
    """

    @staticmethod
    def forward(ctx, plan, stacked, block, *params):  # noqa: D102
        ctx.plan, ctx.num_params = plan, len(params)
        if plan.native:
            ctx.save_for_backward(stacked, *params)
            return _native_forward(plan, stacked, params)
        params = _with_dense(plan, block, params)
        batch, num_maps, c, h, w = stacked.shape
        widths = [num_maps if op == "original" else len(plan.subsets.subsets) for op in plan.groups]
        kept, kept_fused = [], []  # per pass: its softmax and (with mul) its maps, if kept
        for members in plan.passes:
            keep = all(plan.keep[g] for g in members)
            shape = (batch, sum(widths[g] for g in members), c, h, w)
            kept.append(stacked.new_empty(shape) if keep else None)
            with_mul = keep and any(plan.groups[g] == "mul" for g in members)
            kept_fused.append(stacked.new_empty(shape) if with_mul else None)
        extras, chunk_stats = [], []
        for start in range(0, batch, plan.chunk):
            end = start + plan.chunk
            x, target = stacked[start:end], _target_chunk(plan.prepared, start, plan.chunk)
            stats, extra = forward_passes(
                plan.groups,
                plan.passes,
                plan.keep,
                x,
                target,
                plan.subsets,
                params,
                [None if t is None else t[start:end] for t in kept],
                [None if t is None else t[start:end] for t in kept_fused],
                _workspace,
            )
            chunk_stats.append(stats)
            extras += [e for e in extra if e is not None]
        ctx.save_for_backward(stacked, *params, *kept, *kept_fused, *extras)
        return torch.stack(chunk_stats).sum(dim=0) if len(chunk_stats) > 1 else chunk_stats[0]

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):  # noqa: D102
        plan, (stacked, *rest) = ctx.plan, ctx.saved_tensors
        params, rest = rest[: ctx.num_params], rest[ctx.num_params :]
        if plan.native:
            grad_stacked, *grad_params = _native_backward(plan, grad, stacked, params)
            return None, grad_stacked, None, *grad_params
        num_passes = len(plan.passes)
        kept, kept_fused, saved = rest[:num_passes], rest[num_passes : 2 * num_passes], rest[2 * num_passes :]
        with_extra = [
            g
            for g, op in enumerate(plan.groups)
            if op == "awf" and all(plan.keep[m] for p in plan.passes if g in p for m in p)
        ]
        grad_stacked = torch.empty_like(stacked)  # the original group, first, writes every element
        dense_slots = {i for g, *_ in plan.dense if g is not None for i in (2 * g - 2, 2 * g - 1)}
        wanted = ctx.needs_input_grad[2]  # the other slots hold constant tables (add, mul): no gradient
        grad_params = [p if wanted and i in dense_slots else None for i, p in enumerate(params)]  # chunk 0 replaces
        with full_precision(stacked.device):
            for c, start in enumerate(range(0, stacked.shape[0], plan.chunk)):
                end = start + plan.chunk
                target, valid, _ = _target_chunk(plan.prepared, start, plan.chunk)
                extras = [None] * len(plan.groups)
                for j, g in enumerate(with_extra):
                    extras[g] = saved[c * len(with_extra) + j]
                backward_passes(
                    plan.groups,
                    plan.passes,
                    plan.keep,
                    stacked[start:end],
                    (target, valid),
                    plan.subsets,
                    params,
                    grad,
                    grad_stacked[start:end],
                    grad_params,
                    [None if t is None else t[start:end] for t in kept],
                    [None if t is None else t[start:end] for t in kept_fused],
                    extras,
                    _workspace,
                    first=c == 0,
                )
        grad_block = _dense_grad(plan, grad_params, stacked) if ctx.needs_input_grad[2] else None
        return None, grad_stacked, grad_block, *[None if i in dense_slots else gp for i, gp in enumerate(grad_params)]


def _native_specs(plan: _EnginePlan, params: Sequence[Tensor | None]) -> list[GroupSpec]:
    """The kernels' group list: the original maps, then each operator with its packed parameters."""
    specs = []
    for g, op in enumerate(plan.groups):
        weight, bias = (None, None) if op == "original" else params[2 * g - 2 : 2 * g]
        specs.append(GroupSpec(_KERNEL_OP.get(op, op), plan.native[g], weight, bias))
    return specs


def _native_forward(plan: _EnginePlan, stacked: Tensor, params: Sequence[Tensor | None]) -> Tensor:
    """The statistics through the compiled kernels: every group and image in one call, no map stored."""
    prepared = plan.prepared
    return torch.cat(groups_stats(_native_specs(plan, params), stacked, prepared.target, prepared.valid))


def _native_backward(
    plan: _EnginePlan, grad: Tensor, stacked: Tensor, params: Sequence[Tensor | None]
) -> tuple[Tensor | None, ...]:
    """Gradients of :func:`_native_forward`: ``(grad stacked, *grad params)``; every fusion is recomputed."""
    specs = _native_specs(plan, params)
    grads = grad.split([spec.layout.offsets.numel() - 1 for spec in specs])
    grad_stacked = torch.empty_like(stacked)  # the original group, first, writes every element
    prepared = plan.prepared
    outs = groups_grad(specs, stacked, grads, prepared.target, prepared.valid, grad_stacked)
    grad_params: list[Tensor | None] = []
    for out, weight, bias in zip(outs[1:], params[0::2], params[1::2]):  # out: cat/awf (grad weight, grad bias)
        parts = out or (None, None)
        grad_params += [part if p is not None and p.requires_grad else None for part, p in zip(parts, (weight, bias))]
    return grad_stacked, *grad_params


_KERNEL_OP = {"original": "identity"}


def _passes(
    stacked: Tensor, groups: Sequence[str], num_subsets: int, memory_efficient: bool
) -> tuple[tuple[int, ...], ...]:
    """Groups per pass: one per pass on the CPU and with ``memory_efficient``, else packed up to ``L + 2K`` maps.

    A pass costs about 35 operators (GPU kernel launches) and holds about three buffers of its width in backward.
    ``L + 2K`` (two passes for the four operators: original, add, mul | cat, awf) is the widest whose peak stays near
    the one-group-per-pass engine's (which kept the original and ``cat`` softmax); one pass of all ``L + 4K`` maps
    would save another ~35 operators for about 1.8x that peak.
    """
    num_maps = stacked.shape[1]
    widths = [num_maps if op == "original" else num_subsets for op in groups]
    if batched.loops(stacked) or memory_efficient:
        return pack_passes(widths, 0)
    return pack_passes(widths, num_maps + 2 * num_subsets)


def _chunk_size(stacked: Tensor, width: int, memory_efficient: bool) -> int:
    """Images per chunk: the whole batch on a GPU, else as many as fit ``_CHUNK_BYTES`` in a pass of ``width`` maps.

    On the CPU the bound keeps the cached buffers small; with ``memory_efficient`` it bounds the memory.
    """
    batch, num_maps, c, h, w = stacked.shape
    if stacked.device.type != "cpu" and not memory_efficient:
        return batch
    per_image = width * c * h * w * stacked.element_size()
    return max(1, min(batch, _CHUNK_BYTES // per_image))


def _target_chunk(prepared: CEDiceTarget, start: int, size: int) -> tuple[Tensor, Tensor | None, Tensor]:
    """``(target, valid, onehot)`` of images ``start .. start + size``."""
    valid = None if prepared.valid is None else prepared.valid[start : start + size]
    return prepared.target[start : start + size], valid, prepared.onehot[start : start + size]


_WORKSPACE = threading.local()


def _workspace(name: str, like: Tensor, shape: Sequence[int] | None = None) -> Tensor:
    """A scratch tensor of ``shape`` (default ``like.shape``), reused across calls on the CPU.

    Fresh large CPU allocations are returned to the OS on free and page-faulted back in on first touch, which costs
    more than the arithmetic here; each thread keeps one buffer per name and grows it as needed. On other devices
    the caching allocator already reuses memory, so this is ``like.new_empty(shape)``.
    """
    shape = tuple(like.shape if shape is None else shape)
    if like.device.type != "cpu" or torch.compiler.is_compiling():
        return like.new_empty(shape)
    cache = _WORKSPACE.__dict__.setdefault("buffers", {})
    numel, key = math.prod(shape), (name, like.dtype, torch.is_inference_mode_enabled())
    buffer = cache.get(key)
    if buffer is None or buffer.numel() < numel:
        buffer = cache[key] = like.new_empty(numel)
    return buffer[:numel].view(shape)
