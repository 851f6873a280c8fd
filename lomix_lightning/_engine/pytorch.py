"""The PyTorch form of the fused CE + Dice engine: chunks of images, passes of groups, a hand-written backward.

Each operator writes all its mutants into one reused buffer, one softmax serves CE and Dice, and only sums leave the
forward. The backward keeps the softmax of a few groups and recomputes the rest chunk by chunk, which bounds memory.
The ``cat``/``awf`` convolutions arrive as one dense block (:class:`TorchInputs`), sliced here into each operator's
``(rows, L*C)`` weight and ``(rows,)`` bias.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from lomix_lightning._engine import batched
from lomix_lightning._engine.passes import backward_passes, forward_passes, pack_passes
from lomix_lightning._engine.plan import SubsetPlan
from lomix_lightning.losses.ce_dice import CEDiceTarget
from lomix_lightning.losses.precision import full_precision

DenseSlice = tuple[str, int, int, int]
"""One operator's place in the dense block: ``(operator, start, rows, L*C)``; its ``(rows,)`` bias follows."""


class TorchInputs(NamedTuple):
    """The fusion parameters the PyTorch engine reads, handed in by the caller.

    Attributes:
        block: Every ``cat``/``awf`` dense weight and bias in one flat differentiable tensor, or ``None``.
        slices: Per operator in the block, its :data:`DenseSlice`.
        tables: ``add``/``mul``: the constant tables of
            :meth:`~lomix_lightning.CombinatorialMutation.dense_parameters` (``(weight, bias)`` slots).
    """

    block: Tensor | None
    slices: tuple[DenseSlice, ...]
    tables: dict[str, tuple[Tensor | None, Tensor | None]]


_CHUNK_BYTES = 48 * 2**20
"""Size of one operator's mutants for a chunk of images on the CPU or with ``memory_efficient`` (the reused buffers
are about three of these)."""

_KEPT = ("original", "cat")
"""Groups whose softmax the default engine keeps for backward (the others are recomputed, to bound memory)."""


@dataclass(frozen=True)
class TorchPlan:
    """What the PyTorch engine computes: groups (``"original"`` first), target, chunking, kept groups, passes.

    ``dense``: per operator of the dense block, ``(group or None, start, rows, L*C)``.
    """

    groups: tuple[str, ...]
    subsets: SubsetPlan
    prepared: CEDiceTarget
    chunk: int
    keep: tuple[bool, ...]
    passes: tuple[tuple[int, ...], ...]
    dense: tuple[tuple[int | None, int, int, int], ...]


def plan(
    stacked: Tensor, groups: tuple[str, ...], subsets: SubsetPlan, prepared: CEDiceTarget, inputs: TorchInputs,
    memory_efficient: bool,
) -> tuple[TorchPlan, list[Tensor | None]]:  # fmt: skip
    """The plan and the per-group ``(weight, bias)`` slots (``cat``/``awf`` left ``None``: views of the block)."""
    num_subsets = len(subsets.subsets)
    keep = tuple(not memory_efficient and op in _KEPT for op in groups)
    passes = _passes(stacked, groups, num_subsets, memory_efficient)
    width = max(sum(stacked.shape[1] if groups[g] == "original" else num_subsets for g in p) for p in passes)
    chunk = _chunk_size(stacked, width, memory_efficient)
    dense = tuple((groups.index(op) if op in groups else None, s, r, n) for op, s, r, n in inputs.slices)
    params = [p for op in groups[1:] for p in inputs.tables.get(op, (None, None))]
    return TorchPlan(groups, subsets, prepared, chunk, keep, passes, dense), params


def _with_dense(plan: TorchPlan, block: Tensor | None, params: Sequence[Tensor | None]) -> list[Tensor | None]:
    """``params`` with the ``cat``/``awf`` slots filled by their views of the dense block."""
    params = list(params)
    for g, start, rows, num_in in plan.dense:
        if g is not None:
            weight = block[start : start + rows * num_in].view(rows, num_in)  # (rows, L*C)
            params[2 * g - 2 : 2 * g] = [weight, block[start + rows * num_in : start + rows * (num_in + 1)]]
    return params


def _dense_grad(plan: TorchPlan, grad_params: Sequence[Tensor | None], like: Tensor) -> Tensor | None:
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


def forward(plan: TorchPlan, stacked: Tensor, block: Tensor | None, params: Sequence[Tensor | None]):
    """``(stats, params, saved)``: the ``(M, 1 + 2C)`` statistics, the filled slots and what backward needs."""
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
    stats = torch.stack(chunk_stats).sum(dim=0) if len(chunk_stats) > 1 else chunk_stats[0]
    return stats, params, [*kept, *kept_fused, *extras]


def backward(plan: TorchPlan, grad: Tensor, stacked: Tensor, params, rest, block_grad: bool):
    """``(grad stacked, grad block, *grad params)`` (the ``cat``/``awf`` slots ``None``: in the block's gradient)."""
    num_passes = len(plan.passes)
    kept, kept_fused, saved = rest[:num_passes], rest[num_passes : 2 * num_passes], rest[2 * num_passes :]
    with_extra = [
        g
        for g, op in enumerate(plan.groups)
        if op == "awf" and all(plan.keep[m] for p in plan.passes if g in p for m in p)
    ]
    grad_stacked = torch.empty_like(stacked)  # the original group, first, writes every element
    dense_slots = {i for g, *_ in plan.dense if g is not None for i in (2 * g - 2, 2 * g - 1)}
    # the other slots hold constant tables (add, mul): no gradient; chunk 0 replaces the placeholders
    grad_params = [p if block_grad and i in dense_slots else None for i, p in enumerate(params)]
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
    grad_block = _dense_grad(plan, grad_params, stacked) if block_grad else None
    return grad_stacked, grad_block, *[None if i in dense_slots else gp for i, gp in enumerate(grad_params)]


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
