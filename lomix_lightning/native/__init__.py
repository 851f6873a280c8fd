"""Optional compiled CPU kernels for the fused CE + Dice engine (``ce_dice.c``, loaded with :mod:`ctypes`).

On the CPU, LoMix's fusions, softmaxes, CE and Dice statistics and their gradients are dozens of memory-bound tensor
passes over 48 full-resolution maps; the C kernels compute each operator group per block of 256 pixels, in cache, and
store no map (see ``benchmarks/``). They are plain C99 without Python or torch headers: the first use compiles them
with the system C compiler (``$CC`` or ``cc``, about a second) into a cache directory, keyed by the source, the flags
and the CPU, and later processes load the cached library. Built with OpenMP they run on torch's own thread team.
Without a compiler, on Windows, or with ``LOMIX_NATIVE=0`` everything runs through the PyTorch implementation, which
computes the same values (the tests compare both). Results do not depend on the thread count.

Environment:
    ``LOMIX_NATIVE``: ``0`` switches the kernels off.
    ``LOMIX_CACHE_DIR``: where to keep the compiled library (default ``$XDG_CACHE_HOME/lomix_lightning`` or
    ``~/.cache/lomix_lightning``; a per-user temporary directory if that is not writable).
    ``CC``: the C compiler.

Example:
    >>> from lomix_lightning.native import native_stats
    >>> logits, target = torch.zeros(1, 1, 2, 1, 2), torch.zeros(1, 1, 2, dtype=torch.long)
    >>> stats = native_stats(logits, target, None)  # None where the kernels are unavailable
    >>> stats is None or torch.allclose(stats, torch.tensor([[1.3863, 1.0, 0.0, 0.5, 0.5]]), atol=1e-4)
    True
"""

from lomix_lightning.native._build import library
from lomix_lightning.native.kernels import (
    MAX_CLASSES,
    MAX_MEMBERS,
    GroupLayout,
    GroupSpec,
    groups_grad,
    groups_stats,
    identity_layout,
    native_grad,
    native_stats,
    subset_layout,
    usable,
)

__all__ = [
    "MAX_CLASSES",
    "MAX_MEMBERS",
    "GroupLayout",
    "GroupSpec",
    "groups_grad",
    "groups_stats",
    "identity_layout",
    "library",
    "native_grad",
    "native_stats",
    "subset_layout",
    "usable",
]
