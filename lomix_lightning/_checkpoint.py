"""Reading a checkpoint named by the user: every way the file can be wrong becomes a one-line ``LomixUserError``."""

from __future__ import annotations

import re
from pathlib import Path
from pickle import UnpicklingError
from typing import Any

import torch

from lomix_lightning.errors import LomixUserError

_GLOBAL = re.compile(r"unsupported (?:global:\s*)?GLOBAL\s+(\S+)", re.IGNORECASE)


def unpickling_reason(message: str) -> str:
    """What ``torch.load(weights_only=True)``'s ``UnpicklingError`` means, in one sentence.

    torch words a refused object as ``Unsupported global: GLOBAL mod.Cls was not an allowed global`` or, for the
    modules it blocks (``os``, ``sys``, ...), ``Trying to load unsupported GLOBAL os.system whose module os is
    blocked``; anything else is a file that is not a PyTorch checkpoint.

    Example:
        >>> unpickling_reason("Trying to load unsupported GLOBAL posix.system whose module posix is blocked.")[:60]
        'it holds a pickled object (posix.system) and needs unpicklin'
        >>> unpickling_reason("Weights only load failed. ... WeightsUnpickler error: Unsupported operand 110")
        'it is not a PyTorch checkpoint (WeightsUnpickler error: Unsupported operand 110)'
    """
    match = _GLOBAL.search(message)
    if match is not None:
        name = match.group(1).rstrip(".")
        return (
            f"it holds a pickled object ({name}) and needs unpickling, which torch.load(weights_only=True) refuses "
            "(checkpoints written by lomix hold plain data only; load this one only if you trust it)"
        )
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    detail = next((line for line in lines if "error:" in line.lower()), lines[-1] if lines else "")
    detail = detail.split("WeightsUnpickler error:", 1)[-1].strip() or detail
    return f"it is not a PyTorch checkpoint (WeightsUnpickler error: {detail})"


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a Lightning checkpoint with ``weights_only=True`` on the CPU, or raise a one-line ``LomixUserError``.

    Args:
        path: The file.

    Returns:
        The checkpoint dict (it has a ``state_dict``).

    Raises:
        LomixUserError: If the path does not exist, is a directory, is truncated or damaged, needs unpickling, or
            is not a Lightning checkpoint (no ``state_dict``); the message names the path.

    Example:
        >>> import tempfile, os
        >>> folder = tempfile.mkdtemp()
        >>> read_checkpoint(folder)
        Traceback (most recent call last):
        ...
        lomix_lightning.errors.LomixUserError: checkpoint ... is a directory; give a checkpoint file such as ...
    """
    path = Path(path)
    where = f"checkpoint {str(path)!r}"
    if not path.exists():
        raise LomixUserError(f"{where} does not exist")
    if path.is_dir():
        raise LomixUserError(f"{where} is a directory; give a checkpoint file such as .../checkpoints/last.ckpt")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except UnpicklingError as error:
        raise LomixUserError(f"{where} was refused: {unpickling_reason(str(error))}") from error
    except (RuntimeError, OSError, EOFError, ValueError) as error:  # torch's zip reader: truncated or damaged file
        first = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
        raise LomixUserError(
            f"{where} is not a readable PyTorch checkpoint (truncated or damaged?): {first.split('. ')[0]}"
        ) from error
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        kind = type(checkpoint).__name__
        if isinstance(checkpoint, dict):
            kind = f"a dict with keys {list(checkpoint)[:6]}"
        raise LomixUserError(f"{where} is not a Lightning checkpoint (no 'state_dict'; it holds {kind})")
    return checkpoint
