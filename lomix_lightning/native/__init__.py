"""Optional compiled CPU kernels for the fused CE + Dice engine (``ce_dice.c``, loaded with :mod:`ctypes`).

On the CPU, LoMix's fusions, softmaxes, CE and Dice statistics and their gradients are dozens of memory-bound tensor
passes over 48 full-resolution maps; the C kernels compute each operator group per block of 256 pixels, in cache, and
store no map (see ``benchmarks/``). They are plain C99 without Python or torch headers: the first use compiles them
with the system C compiler (``$CC``, else ``cc``, ``gcc`` or ``clang``; about a second) into a cache directory, keyed
by the source, the compiler, the flags and the CPU, and later processes load the cached library after checking it
(the trust rules are in :mod:`lomix_lightning.native._build`: a directory only the current user can write, a SHA-256
and size recorded beside each library and checked before ``dlopen``, anything else removed and rebuilt). Built with
OpenMP they run on torch's own thread team. Results do not depend on the thread count.

Everything else runs through the PyTorch engine, which computes the same values (the tests compare both): with
``LOMIX_NATIVE=0`` silently; without a usable compiler, on Windows, or when the build fails with one
``RuntimeWarning`` per process saying why; for maps the kernels do not take (float64, more than 32 classes or 16
outputs, a GPU) with one INFO log line per reason. :func:`engine` names the engine for given maps (the module logs
it as the ``engine`` hyper-parameter).

Environment:
    ``LOMIX_NATIVE``: unset or ``auto`` (the kernels when they can be used), ``0`` (off), ``1`` (force: kernels
    that cannot be built or loaded are an error naming the reason; maps they do not take still use PyTorch).
    ``LOMIX_CACHE_DIR``: where to keep the compiled library (default ``$XDG_CACHE_HOME/lomix_lightning`` or
    ``~/.cache/lomix_lightning``, else a per-user directory in the temporary directory).
    ``CC``: the C compiler, with flags if wanted (``CC='gcc -m64'``: the first word is the program).

Example:
    >>> from lomix_lightning.native import native_stats
    >>> logits, target = torch.zeros(1, 1, 2, 1, 2), torch.zeros(1, 1, 2, dtype=torch.long)  # (b, K, C, H, W)
    >>> native_stats(logits, target, None)  # [sum -log p_t, I_0, I_1, Q_0, Q_1]: 2 log 2, 1, 0, 0.5, 0.5
    tensor([[1.3863, 1.0000, 0.0000, 0.5000, 0.5000]])
"""

from lomix_lightning.native._build import library, mode, unavailable_reason
from lomix_lightning.native.kernels import (
    MAX_CLASSES,
    MAX_MEMBERS,
    GroupLayout,
    GroupSpec,
    engine,
    groups_grad,
    groups_stats,
    identity_layout,
    native_grad,
    native_stats,
    subset_layout,
    unsupported,
    usable,
)

__all__ = [
    "MAX_CLASSES",
    "MAX_MEMBERS",
    "GroupLayout",
    "GroupSpec",
    "engine",
    "groups_grad",
    "groups_stats",
    "identity_layout",
    "library",
    "mode",
    "native_grad",
    "native_stats",
    "subset_layout",
    "unavailable_reason",
    "unsupported",
    "usable",
]
