"""The kernels' Python side: one operator group's CE + Dice statistics and gradients, fused per pixel block."""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import torch
from torch import Tensor

from lomix_lightning.native._build import _LOCK, _STATE, library

MAX_CLASSES = 32
"""The kernels' class limit (``MAX_CLASSES`` in ``ce_dice.c``); more classes use the PyTorch implementation."""

MAX_MEMBERS = 16
"""The kernels' subset-size limit (``MAX_MEMBERS``): at most 16 network outputs."""

TILE = 4096
"""Pixels per work item: statistics are reduced per tile, in a fixed order, whatever the thread count."""

OPERATOR_CODES = {"identity": 0, "add": 1, "mul": 2, "cat": 3, "awf": 4}
"""The group kinds of ``ce_dice.c``; ``identity`` scores the source maps themselves (one-member subsets)."""


class _Group(ctypes.Structure):
    """Mirror of ``Group`` in ``ce_dice.c`` (every field 8 bytes)."""

    _fields_ = [
        ("op", ctypes.c_int64),
        *[(name, ctypes.c_void_p) for name in ("src", "target", "valid", "members", "offsets")],
        *[(name, ctypes.c_void_p) for name in ("weight", "bias", "woff", "boff")],
        *[(name, ctypes.c_int64) for name in ("num_src", "num_subsets", "c_count", "n", "tile", "tiles_per_image")],
        *[(name, ctypes.c_void_p) for name in ("stats", "grad", "grad_src", "grad_params")],
        *[(name, ctypes.c_int64) for name in ("num_params", "weight_size", "overwrite")],
    ]


class GroupLayout(NamedTuple):
    """Where each subset's members and 1x1 convolution live in the flat arrays the kernels read.

    Attributes:
        members: int32, subset ``k`` is ``members[offsets[k]:offsets[k + 1]]``.
        offsets: int32 ``(K + 1,)``.
        woff: int64 ``(K,)`` start of subset ``k``'s ``(rows_k, |S| C)`` weight in the packed weight.
        boff: int64 ``(K,)`` start of its ``rows_k`` biases in the packed bias.
        weight_size: Length of the packed weight.
        bias_size: Length of the packed bias.
    """

    members: Tensor
    offsets: Tensor
    woff: Tensor
    boff: Tensor
    weight_size: int
    bias_size: int


def subset_layout(subsets: Sequence[Sequence[int]], num_classes: int = 1, rows: str = "none") -> GroupLayout:
    """The layout of ``subsets``; ``rows`` gives the 1x1 convolutions' outputs: ``"cat"`` (C), ``"awf"`` (``|S|``).

    The packed weight is the per-subset ``nn.Conv2d`` weights ``(rows_k, |S| C, 1, 1)`` flattened and concatenated
    in subset order (:meth:`~lomix_lightning.CombinatorialMutation.packed_parameters`).

    Example:
        >>> layout = subset_layout([(0, 1), (0, 1, 2)], num_classes=2, rows="awf")
        >>> layout.members.tolist(), layout.offsets.tolist(), layout.woff.tolist(), layout.weight_size
        ([0, 1, 0, 1, 2], [0, 2, 5], [0, 8], 26)
    """
    members, offsets, woff, boff = [], [0], [], []
    weight_size = bias_size = 0
    for subset in subsets:
        members.extend(subset)
        offsets.append(offsets[-1] + len(subset))
        out_rows = {"cat": num_classes, "awf": len(subset), "none": 0}[rows]
        woff.append(weight_size)
        boff.append(bias_size)
        weight_size += out_rows * len(subset) * num_classes
        bias_size += out_rows
    return GroupLayout(
        torch.tensor(members, dtype=torch.int32),
        torch.tensor(offsets, dtype=torch.int32),
        torch.tensor(woff, dtype=torch.int64),
        torch.tensor(boff, dtype=torch.int64),
        weight_size,
        bias_size,
    )


def usable(logits: Tensor) -> bool:
    """Whether the kernels take ``(b, L, C, H, W)`` maps: CPU float32, ``C <= 32``, ``L <= 16``, library loaded."""
    return (
        logits.device.type == "cpu"
        and logits.dtype == torch.float32
        and logits.ndim == 5
        and logits.shape[1] <= MAX_MEMBERS
        and logits.shape[2] <= MAX_CLASSES
        and library() is not None
    )


def _pointer(tensor: Tensor | None) -> int | None:
    return None if tensor is None else tensor.data_ptr()


def _pool(threads: int) -> ThreadPoolExecutor:
    with _LOCK:
        pool = _STATE.get("pool")
        if pool is None or pool._max_workers != threads:
            if pool is not None:
                pool.shutdown(wait=False)
            pool = _STATE["pool"] = ThreadPoolExecutor(threads, thread_name_prefix="lomix-native")
        return pool


def _run_tiles(fn, group: _Group, tiles: int) -> None:
    """Call ``fn(group, tile0, tile1, threads)`` over all tiles with torch's thread count.

    An OpenMP build shares the tiles itself; otherwise each thread of a pool takes a range (ctypes releases the GIL).
    """
    threads = max(1, min(torch.get_num_threads(), tiles))
    pointer = ctypes.byref(group)
    if library().openmp or threads == 1:
        fn(pointer, 0, tiles, threads)
        return
    step = -(-tiles // threads)
    pool = _pool(threads)
    futures = [pool.submit(fn, pointer, start, min(tiles, start + step), 1) for start in range(0, tiles, step)]
    for future in futures:
        future.result()


def _group(
    op: str,
    src: Tensor,
    target: Tensor,
    valid: Tensor | None,
    layout: GroupLayout,
    weight: Tensor | None,
    bias: Tensor | None,
    keep: list,
) -> tuple[_Group, int]:
    """The ``Group`` struct (``keep`` holds the tensors it points to) and the number of tiles."""
    b, num_src, c, h, w = src.shape
    if op in ("cat", "awf") and (weight is None or bias is None):
        raise ValueError(f"operator {op!r} needs its packed weight and bias")
    tensors = [
        src.contiguous(),
        target.to(torch.int64).contiguous(),
        None if valid is None else valid.to(torch.float32).contiguous(),
        None if weight is None else weight.to(torch.float32).contiguous(),
        None if bias is None else bias.to(torch.float32).contiguous(),
    ]
    keep.extend(tensors)
    src, target, valid, weight, bias = tensors
    n = h * w
    tiles_per_image = -(-n // TILE)
    group = _Group(
        op=OPERATOR_CODES[op],
        src=_pointer(src),
        target=_pointer(target),
        valid=_pointer(valid),
        members=_pointer(layout.members),
        offsets=_pointer(layout.offsets),
        weight=_pointer(weight),
        bias=_pointer(bias),
        woff=_pointer(layout.woff),
        boff=_pointer(layout.boff),
        num_src=num_src,
        num_subsets=layout.offsets.numel() - 1,
        c_count=c,
        n=n,
        tile=TILE,
        tiles_per_image=tiles_per_image,
        num_params=layout.weight_size + layout.bias_size,
        weight_size=layout.weight_size,
    )
    return group, b * tiles_per_image


def group_stats(
    op: str,
    src: Tensor,
    target: Tensor,
    valid: Tensor | None,
    layout: GroupLayout,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
) -> Tensor:
    """``(K, 1 + 2C)`` CE + Dice statistics of one operator group's maps, fused in the kernel (no map is stored).

    Args:
        op: ``"identity"`` (score the source maps named by one-member subsets), ``"add"``, ``"mul"``, ``"cat"`` or
            ``"awf"``.
        src: ``(b, L, C, H, W)`` float32 maps on the CPU (check :func:`usable` first).
        target: ``(b, H, W)`` class indices in ``[0, C)``.
        valid: ``(b, H, W)`` mask, or ``None``.
        layout: :func:`subset_layout` of the group's ``K`` subsets.
        weight: ``cat``/``awf``: the packed 1x1 convolution weights.
        bias: ``cat``/``awf``: the packed biases.
    """
    keep: list = []
    group, tiles = _group(op, src, target, valid, layout, weight, bias, keep)
    c = src.shape[2]
    stats = torch.empty(tiles, group.num_subsets, 1 + 2 * c, dtype=torch.float64)
    group.stats = stats.data_ptr()
    _run_tiles(library().lomix_group_forward, group, tiles)
    return stats.sum(dim=0).to(src.dtype)


def group_grad(
    op: str,
    src: Tensor,
    grad: Tensor,
    target: Tensor,
    valid: Tensor | None,
    layout: GroupLayout,
    grad_src: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    overwrite: bool = False,
) -> tuple[Tensor, Tensor] | None:
    """Backward of :func:`group_stats` for the statistics' gradient ``grad`` ``(K, 1 + 2C)``.

    Accumulates into ``grad_src`` (contiguous, shaped like ``src``; ``overwrite=True`` with ``identity`` writes it,
    and every source map must then be in the layout). Returns ``(grad weight, grad bias)`` for ``cat``/``awf``.
    """
    if not grad_src.is_contiguous() or grad_src.shape != src.shape or grad_src.dtype != torch.float32:
        raise ValueError(
            f"grad_src must be contiguous float32 of shape {tuple(src.shape)}, got {tuple(grad_src.shape)}"
        )
    keep: list = []
    group, tiles = _group(op, src, target, valid, layout, weight, bias, keep)
    grad = grad.to(torch.float32).contiguous()
    partial = torch.empty(tiles, group.num_params) if op in ("cat", "awf") else None
    group.grad, group.grad_src, group.grad_params = grad.data_ptr(), grad_src.data_ptr(), _pointer(partial)
    group.overwrite = int(overwrite)
    _run_tiles(library().lomix_group_backward, group, tiles)
    if partial is None:
        return None
    total = partial.sum(dim=0, dtype=torch.float64).to(torch.float32)
    return total[: layout.weight_size], total[layout.weight_size :]


def native_stats(logits: Tensor, target: Tensor, valid: Tensor | None) -> Tensor | None:
    """``(K, 1 + 2C)`` CE + Dice statistics of ``(b, K, C, H, W)`` logits (as ``ce_dice_stats``), or ``None``.

    ``None`` when the kernels do not take these logits (see :func:`usable`).
    """
    if not usable(logits):
        return None
    return group_stats("identity", logits, target, valid, identity_layout(logits.shape[1]))


def native_grad(logits: Tensor, grad: Tensor, target: Tensor, valid: Tensor | None, out: Tensor) -> Tensor | None:
    """Gradient of ``sum(grad * stats)`` with respect to ``(b, K, C, H, W)`` logits, written to ``out``, or ``None``."""
    if not usable(logits):
        return None
    group_grad("identity", logits, grad, target, valid, identity_layout(logits.shape[1]), out, overwrite=True)
    return out


def identity_layout(num_maps: int) -> GroupLayout:
    """One-member subsets ``(0,), (1,), ...``: score the source maps themselves."""
    return subset_layout([(i,) for i in range(num_maps)])
