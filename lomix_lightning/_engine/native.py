"""Optional compiled CPU kernels for the fused CE + Dice engine (``ce_dice.c``, loaded with :mod:`ctypes`).

On the CPU, LoMix's fusions, softmaxes, CE and Dice statistics and their gradients are dozens of memory-bound tensor
passes over 48 full-resolution maps; the C kernels compute each operator group per block of 256 pixels, in cache, and
store no map (see ``benchmarks/``). They are plain C99 without Python or torch headers: the first use compiles them
with the system C compiler (``$CC``, else ``cc``, ``gcc`` or ``clang``; about a second) into a cache directory, keyed
by the source, the compiler, the flags and the CPU, and later processes load the cached library after checking it
(the trust rules are in :mod:`lomix_lightning._engine._build`). Built with OpenMP they run on torch's own thread
team. Results do not depend on the thread count. The groups' packed layout is :mod:`lomix_lightning._engine`'s.

Everything else runs through the PyTorch engine, which computes the same values (the tests compare both): with
``LOMIX_NATIVE=0`` or ``LoMixLoss(engine="torch")`` silently; without a usable compiler, on Windows, or when the build
fails with one ``RuntimeWarning`` per process saying why; for maps the kernels do not take (float64, more than 32
classes or 16 outputs, a GPU) with one INFO log line per reason. :func:`engine` names the engine for given maps.

Environment:
    ``LOMIX_NATIVE``: unset or ``auto`` (the kernels when they can be used), ``0`` (off), ``1`` (force: kernels
    that cannot be built or loaded are an error naming the reason; maps they do not take still use PyTorch).
    ``LOMIX_CACHE_DIR``: where to keep the compiled library (default ``$XDG_CACHE_HOME/lomix_lightning`` or
    ``~/.cache/lomix_lightning``, else a per-user directory in the temporary directory).
    ``CC``: the C compiler, with flags if wanted (``CC='gcc -m64'``: the first word is the program).
"""

from __future__ import annotations

import ctypes
import logging
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor

from lomix_lightning._engine._build import first_note, library, unavailable_reason

if TYPE_CHECKING:
    from lomix_lightning._engine import GroupLayout

_log = logging.getLogger(__name__)

MAX_CLASSES = 32
"""The kernels' class limit (``MAX_CLASSES`` in ``ce_dice.c``); more classes use the PyTorch implementation."""

MAX_MEMBERS = 16
"""The kernels' subset-size limit (``MAX_MEMBERS``): at most 16 network outputs."""

TILE = 1024
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


def unsupported(device: torch.device, dtype: torch.dtype, num_classes: int, num_maps: int) -> str | None:
    """Why the kernels do not take ``num_maps`` maps of ``num_classes`` classes (``None``: they do, once loaded).

    Example:
        >>> unsupported(torch.device("cpu"), torch.float64, 3, 4)
        'float64 maps (the kernels take float32)'
    """
    if device.type != "cpu":
        return f"maps on {device.type}"
    if dtype != torch.float32:
        return f"{str(dtype).removeprefix('torch.')} maps (the kernels take float32)"
    if num_classes > MAX_CLASSES:
        return f"{num_classes} classes (the kernels take at most {MAX_CLASSES})"
    if num_maps > MAX_MEMBERS:
        return f"{num_maps} outputs (the kernels take at most {MAX_MEMBERS})"
    return None


def usable(logits: Tensor) -> bool:
    """Whether the kernels take ``(b, L, C, H, W)`` maps: CPU float32, ``C <= 32``, ``L <= 16``, library loaded.

    Maps they do not take (float64, more classes or outputs) are legitimate and run on the PyTorch engine; that is
    logged once per reason at INFO level (``lomix_lightning._engine.native``), not warned about.
    """
    if logits.ndim != 5:
        return False
    why = unsupported(logits.device, logits.dtype, logits.shape[2], logits.shape[1])
    if why is None:
        return library() is not None
    if logits.device.type == "cpu" and first_note(why):
        _log.info("lomix_lightning: the loss runs on the PyTorch engine for %s", why)
    return False


def engine(device: torch.device, dtype: torch.dtype, num_classes: int, num_maps: int) -> str:
    """Which engine computes CE + Dice for such maps: ``"native"`` or ``"pytorch (<why>)"`` (loads the kernels).

    Example:
        >>> engine(torch.device("meta"), torch.float32, 3, 4)
        'pytorch: maps on meta'
    """
    why = unsupported(device, dtype, num_classes, num_maps)
    if why is None:
        if library() is not None:
            return "native"
        why = unavailable_reason()
    return f"pytorch: {why}"


def _pointer(tensor: Tensor | None) -> int | None:
    return None if tensor is None else tensor.data_ptr()


_POOL_LOCK = threading.Lock()
_POOL: dict[str, ThreadPoolExecutor] = {}


def _pool(threads: int) -> ThreadPoolExecutor:
    with _POOL_LOCK:
        pool = _POOL.get("pool")
        if pool is None or pool._max_workers != threads:
            if pool is not None:
                pool.shutdown(wait=False)
            pool = _POOL["pool"] = ThreadPoolExecutor(threads, thread_name_prefix="lomix-native")
        return pool


def _run_tiles(fn, groups: ctypes.Array, tiles: int) -> None:
    """Call ``fn(groups, len(groups), tile0, tile1, threads)`` over all tiles with torch's thread count.

    An OpenMP build shares the tiles itself; otherwise each thread of a pool takes a range (ctypes releases the GIL).
    """
    threads = max(1, min(torch.get_num_threads(), tiles))
    if library().openmp or threads == 1:
        fn(groups, len(groups), 0, tiles, threads)
        return
    step = -(-tiles // threads)
    pool = _pool(threads)
    futures = [pool.submit(fn, groups, len(groups), s, min(tiles, s + step), 1) for s in range(0, tiles, step)]
    for future in futures:
        future.result()


class GroupSpec(NamedTuple):
    """One operator group for :func:`groups_stats`: its kind, layout and (``cat``/``awf``) packed parameters.

    ``op`` is ``"identity"`` (score the source maps named by one-member subsets), ``"add"``, ``"mul"``, ``"cat"`` or
    ``"awf"``; ``weight``/``bias`` are packed by :func:`lomix_lightning._engine.pack`.
    """

    op: str
    layout: GroupLayout
    weight: Tensor | None = None
    bias: Tensor | None = None


def _groups(
    specs: Sequence[GroupSpec], src: Tensor, target: Tensor, valid: Tensor | None, keep: list
) -> tuple[ctypes.Array, int]:
    """The ``Group`` structs (``keep`` holds the tensors they point to) and the number of tiles."""
    b, num_src, c, h, w = src.shape
    src, target = src.contiguous(), target.to(torch.int64).contiguous()
    valid = None if valid is None else valid.to(torch.float32).contiguous()
    keep.extend([src, target, valid])
    n = h * w
    tiles_per_image = -(-n // TILE)
    groups = (_Group * len(specs))()
    for group, spec in zip(groups, specs):
        if spec.op in ("cat", "awf") and (spec.weight is None or spec.bias is None):
            raise ValueError(f"operator {spec.op!r} needs its packed weight and bias")
        weight, bias = (None if t is None else t.detach().to(torch.float32).contiguous() for t in spec[2:])
        keep.extend([weight, bias])
        layout = spec.layout
        group.op, group.src, group.target, group.valid = OPERATOR_CODES[spec.op], *map(_pointer, (src, target, valid))
        group.members, group.offsets = _pointer(layout.members), _pointer(layout.offsets)
        group.weight, group.bias = _pointer(weight), _pointer(bias)
        group.woff, group.boff = _pointer(layout.woff), _pointer(layout.boff)
        group.num_src, group.num_subsets, group.c_count, group.n = num_src, layout.offsets.numel() - 1, c, n
        group.tile, group.tiles_per_image = TILE, tiles_per_image
        group.num_params, group.weight_size = layout.weight_size + layout.bias_size, layout.weight_size
    return groups, b * tiles_per_image


def groups_stats(specs: Sequence[GroupSpec], src: Tensor, target: Tensor, valid: Tensor | None) -> list[Tensor]:
    """Per group, the ``(K, 1 + 2C)`` CE + Dice statistics of its maps, fused in the kernel (no map is stored).

    One call runs every group on each tile of pixels in turn, so the source maps are read from memory once.

    Args:
        specs: The operator groups.
        src: ``(b, L, C, H, W)`` float32 maps on the CPU (check :func:`usable` first).
        target: ``(b, H, W)`` class indices in ``[0, C)``.
        valid: ``(b, H, W)`` mask, or ``None``.
    """
    keep: list = []
    groups, tiles = _groups(specs, src, target, valid, keep)
    c = src.shape[2]
    stats = [torch.empty(tiles, group.num_subsets, 1 + 2 * c, dtype=torch.float64) for group in groups]
    for group, out in zip(groups, stats):
        group.stats = out.data_ptr()
    _run_tiles(library().lomix_groups_forward, groups, tiles)
    return [out.sum(dim=0).to(src.dtype) for out in stats]


def groups_grad(
    specs: Sequence[GroupSpec],
    src: Tensor,
    grads: Sequence[Tensor],
    target: Tensor,
    valid: Tensor | None,
    grad_src: Tensor,
) -> list[tuple[Tensor, Tensor] | None]:
    """Backward of :func:`groups_stats` for the statistics' gradients ``grads`` (per group ``(K, 1 + 2C)``).

    Accumulates into ``grad_src`` (contiguous float32, shaped like ``src``), except that a first ``identity`` group
    that names every source map writes it (so ``grad_src`` may start uninitialised). Returns per group
    ``(grad weight, grad bias)`` for ``cat``/``awf``, else ``None``.
    """
    if not grad_src.is_contiguous() or grad_src.shape != src.shape or grad_src.dtype != torch.float32:
        raise ValueError(f"grad_src must be contiguous float32 shaped {tuple(src.shape)}, got {tuple(grad_src.shape)}")
    keep: list = []
    groups, tiles = _groups(specs, src, target, valid, keep)
    partials = []
    for i, (group, spec, grad) in enumerate(zip(groups, specs, grads)):
        grad = grad.detach().to(torch.float32).contiguous()
        partial = torch.empty(tiles, group.num_params) if spec.op in ("cat", "awf") else None
        keep.extend([grad, partial])
        partials.append(partial)
        group.grad, group.grad_src, group.grad_params = grad.data_ptr(), grad_src.data_ptr(), _pointer(partial)
        group.overwrite = int(i == 0 and spec.op == "identity" and group.num_subsets == src.shape[1])
    if not groups[0].overwrite:
        grad_src.zero_()
    _run_tiles(library().lomix_groups_backward, groups, tiles)
    results: list[tuple[Tensor, Tensor] | None] = []
    for spec, partial in zip(specs, partials):
        if partial is None:
            results.append(None)
            continue
        total = partial.sum(dim=0, dtype=torch.float64).to(torch.float32)
        results.append((total[: spec.layout.weight_size], total[spec.layout.weight_size :]))
    return results
