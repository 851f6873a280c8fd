"""Count what a piece of code asks of the device: operators (about one kernel launch each) and host reads.

:class:`OpCounter` is a ``TorchDispatchMode``: it sees every aten operator, on any device, including ``meta`` (no
data: shapes only), which takes the same branches as CUDA in this package. It is how the GPU path was checked
without a GPU (``tests/test_op_count.py``, ``benchmarks/run.py``).
"""

from __future__ import annotations

import collections
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

SYNC_OPS: frozenset[str] = frozenset(
    {
        "_local_scalar_dense",  # .item(), bool(), float(), int() of a tensor
        "is_nonzero",
        "equal",
        "nonzero",  # boolean-mask indexing, torch.where(cond)
        "masked_select",
        "_unique2",
        "unique_dim",
        "unique_consecutive",
        "repeat_interleave",
    }
)
"""Operators that read a value back to the host: on CUDA each waits for the device queue to drain."""


class OpCounter(TorchDispatchMode):
    """Counts the aten operators run inside it (views excluded) and the host reads among them.

    A copy from a non-CPU tensor to the CPU counts as a host read too.

    Attributes:
        ops: ``{operator name: calls}`` of the non-view operators.
        syncs: ``{operator name: calls}`` of the host reads.

    Example:
        >>> with OpCounter() as counter:
        ...     x = torch.ones(3)
        ...     y = (x * 2).sum()
        ...     bool(y > 1)
        True
        >>> counter.total, counter.num_syncs
        (5, 1)
    """

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()
        self.syncs: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        """Run ``func`` and count it."""
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func.is_view:
            return out
        name = func.overloadpacket.__name__
        self.ops[name] += 1
        if name in SYNC_OPS or (name in ("_to_copy", "copy_") and _to_host(args, out)):
            self.syncs[name] += 1
        return out

    @property
    def total(self) -> int:
        """Number of non-view operators run."""
        return sum(self.ops.values())

    @property
    def num_syncs(self) -> int:
        """Number of host reads."""
        return sum(self.syncs.values())


def _to_host(args: tuple, out: Any) -> bool:
    """Whether a copy moves a non-CPU tensor's values to the CPU."""
    sources = [a for a in args if isinstance(a, torch.Tensor)]
    target = out if isinstance(out, torch.Tensor) else None
    if target is None or not sources:
        return False
    source = sources[-1] if len(sources) > 1 else sources[0]  # copy_(dst, src): the source is the last
    return target.device.type == "cpu" and source.device.type not in ("cpu", "meta")
