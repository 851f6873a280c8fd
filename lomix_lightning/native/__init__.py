"""Optional compiled CPU kernels for the fused CE + Dice engine (``ce_dice.c``, loaded with :mod:`ctypes`).

On the CPU, the per-map softmax, CE and Dice statistics and their gradient are memory-bound tensor passes; the C
kernels do each in one pass over the logits (about 3x faster, see ``benchmarks/``). They are plain C99 without
Python or torch headers: the first use compiles them with the system C compiler (``$CC`` or ``cc``, under a second)
into a cache directory, keyed by the source, the flags and the CPU, and later processes load the cached library.
Without a compiler, on another platform or with ``LOMIX_NATIVE=0`` everything runs through the PyTorch
implementation, which computes the same values (the tests compare both). Results do not depend on the thread count.

Environment:
    ``LOMIX_NATIVE``: ``0`` switches the kernels off.
    ``LOMIX_CACHE_DIR``: where to keep the compiled library (default ``$XDG_CACHE_HOME/lomix_lightning`` or
    ``~/.cache/lomix_lightning``).
    ``CC``: the C compiler.

Example:
    >>> from lomix_lightning.native import native_stats
    >>> logits, target = torch.zeros(1, 1, 2, 1, 2), torch.zeros(1, 1, 2, dtype=torch.long)
    >>> stats = native_stats(logits, target, None)  # None where the kernels are unavailable
    >>> stats is None or torch.allclose(stats, torch.tensor([[1.3863, 1.0, 0.0, 0.5, 0.5]]), atol=1e-4)
    True
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch import Tensor

MAX_CLASSES = 32
"""The kernels' class limit (``MAX_CLASSES`` in ``ce_dice.c``); more classes use the PyTorch implementation."""

_SOURCE = Path(__file__).with_name("ce_dice.c")
_FLAG_SETS = (
    ["-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math"],
    ["-O3", "-fno-math-errno", "-fno-trapping-math"],  # compilers without -march=native
)
_LOCK = threading.Lock()
_STATE: dict = {}


def _cache_dir() -> Path:
    if os.environ.get("LOMIX_CACHE_DIR"):
        return Path(os.environ["LOMIX_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lomix_lightning"


def _cpu_id() -> str:
    """What ``-march=native`` depends on: the CPU model and feature flags (a cached build is per CPU)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            lines = [line for line in cpuinfo if line.startswith(("model name", "flags", "Features"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor() + platform.machine()


def _compile(compiler: str, flags: list[str], target: Path) -> None:
    """Compile ``ce_dice.c`` to ``target`` through a temporary file (atomic: concurrent processes may race)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(handle)
    try:
        command = [compiler, *flags, "-fPIC", "-shared", "-std=c99", "-o", tmp, str(_SOURCE), "-lm"]
        subprocess.run(command, check=True, capture_output=True, timeout=120)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _load() -> ctypes.CDLL | None:
    """Build (once per machine) and load the library; ``None`` with one warning if that is not possible."""
    if os.environ.get("LOMIX_NATIVE", "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    if sys.platform == "win32":
        return None
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        return None
    errors = []
    for flags in _FLAG_SETS:
        key = hashlib.sha256(
            b"\0".join([_SOURCE.read_bytes(), " ".join(flags).encode(), compiler.encode(), _cpu_id().encode()])
        ).hexdigest()[:16]
        target = _cache_dir() / f"ce_dice-{key}.so"
        try:
            if not target.exists():
                _compile(compiler, flags, target)
            lib = ctypes.CDLL(str(target))
        except (OSError, subprocess.SubprocessError) as err:
            stderr = getattr(err, "stderr", b"") or b""
            errors.append(f"{err} {stderr.decode(errors='replace').strip()[:300]}")
            continue
        pointer, i32, i64 = ctypes.c_void_p, ctypes.c_int32, ctypes.c_int64
        common = [i32] + [pointer] * 6 + [i64] * 6
        lib.lomix_group_forward.argtypes = [*common, pointer, i64, i64]
        lib.lomix_group_forward.restype = None
        lib.lomix_group_backward.argtypes = [*common, pointer, pointer, pointer, i32, i64, i64]
        lib.lomix_group_backward.restype = None
        return lib
    warnings.warn(
        "lomix_lightning: could not build the native CPU kernels, using the PyTorch implementation (same values, "
        f"slower on the CPU; set LOMIX_NATIVE=0 to skip this attempt): {'; '.join(errors)}",
        RuntimeWarning,
        stacklevel=3,
    )
    return None


def library() -> ctypes.CDLL | None:
    """The loaded kernels, or ``None`` (switched off, no compiler, or the build failed); built on first call."""
    with _LOCK:
        if "lib" not in _STATE:
            _STATE["lib"] = _load()
        return _STATE["lib"]


def _pool(threads: int) -> ThreadPoolExecutor:
    with _LOCK:
        pool = _STATE.get("pool")
        if pool is None or pool._max_workers != threads:
            if pool is not None:
                pool.shutdown(wait=False)
            pool = _STATE["pool"] = ThreadPoolExecutor(threads, thread_name_prefix="lomix-native")
        return pool


def _run_tiles(fn, tiles: int, args: tuple, extra: tuple) -> None:
    """Call ``fn(*args, tile0, tile1, *extra)`` over tile ranges, one per torch thread (ctypes releases the GIL)."""
    threads = max(1, min(torch.get_num_threads(), tiles))
    if threads == 1:
        fn(*args, 0, tiles, *extra)
        return
    step = -(-tiles // threads)
    pool = _pool(threads)
    futures = [pool.submit(fn, *args, start, min(tiles, start + step), *extra) for start in range(0, tiles, step)]
    for future in futures:
        future.result()


def usable(logits: Tensor) -> bool:
    """Whether the kernels take ``(b, K, C, H, W)`` logits: CPU float32, ``C <= 32``, and the library loads."""
    return (
        logits.device.type == "cpu"
        and logits.dtype == torch.float32
        and logits.ndim == 5
        and logits.shape[2] <= MAX_CLASSES
        and library() is not None
    )


def _pointer(tensor: Tensor | None) -> int | None:
    return None if tensor is None else tensor.data_ptr()


OPERATOR_CODES = {"identity": 0, "add": 1, "mul": 2, "awf": 3}
"""The group kinds of ``ce_dice.c``: ``identity`` scores the source maps themselves."""

TILE = 4096
"""Pixels per work item: statistics are reduced per tile, in a fixed order, whatever the thread count."""


def subset_layout(subsets: Sequence[Sequence[int]]) -> tuple[Tensor, Tensor]:
    """``(members, offsets)`` int32: subset ``k`` is ``members[offsets[k]:offsets[k + 1]]``.

    Example:
        >>> subset_layout([(0, 1), (0, 1, 2)])
        (tensor([0, 1, 0, 1, 2], dtype=torch.int32), tensor([0, 2, 5], dtype=torch.int32))
    """
    members = [i for subset in subsets for i in subset]
    offsets = [0]
    for subset in subsets:
        offsets.append(offsets[-1] + len(subset))
    return torch.tensor(members, dtype=torch.int32), torch.tensor(offsets, dtype=torch.int32)


def _checked(src: Tensor, target: Tensor, valid: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
    return (
        src.contiguous(),
        target.to(torch.int64).contiguous(),
        None if valid is None else valid.to(torch.float32).contiguous(),
    )


def group_stats(
    op: str,
    src: Tensor,
    target: Tensor,
    valid: Tensor | None,
    layout: tuple[Tensor, Tensor],
    scores: Tensor | None = None,
) -> Tensor:
    """``(K, 1 + 2C)`` CE + Dice statistics of one operator group's maps, fused in the kernel (no map is stored).

    Args:
        op: ``"identity"`` (score the source maps given by one-member subsets), ``"add"``, ``"mul"`` or ``"awf"``.
        src: ``(b, L, C, H, W)`` float32 source maps on the CPU (check :func:`usable` first).
        target: ``(b, H, W)`` class indices in ``[0, C)``.
        valid: ``(b, H, W)`` mask, or ``None``.
        layout: :func:`subset_layout` of the group's ``K`` subsets.
        scores: ``awf``: ``(b, sum |S|, H*W)`` scores before the softmax over each subset's members.
    """
    b, num_src, c, h, w = src.shape
    src, target, valid = _checked(src, target, valid)
    members, offsets = layout
    num_subsets, n = offsets.numel() - 1, h * w
    num_scores = 0 if scores is None else scores.shape[1]
    scores = None if scores is None else scores.contiguous()
    tiles = b * -(-n // TILE)
    stats = torch.empty(tiles, num_subsets, 1 + 2 * c, dtype=torch.float64)
    args = (
        OPERATOR_CODES[op], _pointer(src), _pointer(scores), _pointer(target), _pointer(valid), _pointer(members),
        _pointer(offsets), num_src, num_subsets, num_scores, c, n, TILE, _pointer(stats),
    )  # fmt: skip
    _run_tiles(library().lomix_group_forward, tiles, args, ())
    return stats.sum(dim=0).to(src.dtype)


def group_grad(
    op: str,
    src: Tensor,
    grad: Tensor,
    target: Tensor,
    valid: Tensor | None,
    layout: tuple[Tensor, Tensor],
    grad_src: Tensor,
    scores: Tensor | None = None,
    grad_scores: Tensor | None = None,
    overwrite: bool = False,
) -> None:
    """Backward of :func:`group_stats` for the statistics' gradient ``grad`` ``(K, 1 + 2C)``.

    ``grad_src`` (contiguous, like ``src``) is accumulated into (``overwrite=True`` with ``identity``: written; every
    source map must then be in the layout); ``awf`` writes ``grad_scores`` (contiguous, like ``scores``).
    """
    b, num_src, c, h, w = src.shape
    src, target, valid = _checked(src, target, valid)
    if not grad_src.is_contiguous() or grad_src.shape != src.shape:
        raise ValueError(f"grad_src must be contiguous with shape {tuple(src.shape)}, got {tuple(grad_src.shape)}")
    members, offsets = layout
    num_subsets, n = offsets.numel() - 1, h * w
    num_scores = 0 if scores is None else scores.shape[1]
    scores = None if scores is None else scores.contiguous()
    grad = grad.to(torch.float32).contiguous()
    tiles = b * -(-n // TILE)
    args = (
        OPERATOR_CODES[op], _pointer(src), _pointer(scores), _pointer(target), _pointer(valid), _pointer(members),
        _pointer(offsets), num_src, num_subsets, num_scores, c, n, TILE, _pointer(grad), _pointer(grad_src),
        _pointer(grad_scores), int(overwrite),
    )  # fmt: skip
    _run_tiles(library().lomix_group_backward, tiles, args, ())


def native_stats(logits: Tensor, target: Tensor, valid: Tensor | None) -> Tensor | None:
    """``(K, 1 + 2C)`` CE + Dice statistics of ``(b, K, C, H, W)`` logits (as ``ce_dice_stats``), or ``None``.

    ``None`` when the kernels do not take these logits (see :func:`usable`).
    """
    if not usable(logits):
        return None
    return group_stats("identity", logits, target, valid, _identity_layout(logits.shape[1]))


def native_grad(logits: Tensor, grad: Tensor, target: Tensor, valid: Tensor | None, out: Tensor) -> Tensor | None:
    """Gradient of ``sum(grad * stats)`` with respect to ``(b, K, C, H, W)`` logits, written to ``out``, or ``None``."""
    if not usable(logits) or out.dtype != torch.float32:
        return None
    group_grad("identity", logits, grad, target, valid, _identity_layout(logits.shape[1]), out, overwrite=True)
    return out


def _identity_layout(num_maps: int) -> tuple[Tensor, Tensor]:
    return torch.arange(num_maps, dtype=torch.int32), torch.arange(num_maps + 1, dtype=torch.int32)
