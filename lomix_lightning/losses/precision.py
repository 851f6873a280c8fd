"""The float32 region of the losses: fusion and per-map losses run in at least float32, autocast or not."""

from __future__ import annotations

import contextlib
from contextlib import AbstractContextManager

import torch


def fusion_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype fusion and per-map losses run in: at least float32 (products of logits overflow float16).

    Example:
        >>> fusion_dtype(torch.bfloat16), fusion_dtype(torch.float64)
        (torch.float32, torch.float64)
    """
    return torch.promote_types(dtype, torch.float32)


def full_precision(device: torch.device) -> AbstractContextManager:
    """A context that switches autocast off on ``device``, so fusion and losses stay in float32.

    Devices without autocast (``meta``, which the tests use to trace the CUDA path without a GPU) get a no-op.

    Example:
        >>> with torch.autocast("cpu", dtype=torch.bfloat16), full_precision(torch.device("cpu")):
        ...     (torch.ones(2, 2) @ torch.ones(2, 2)).dtype
        torch.float32
    """
    if not torch.amp.is_autocast_available(device.type):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, enabled=False)
