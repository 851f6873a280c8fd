"""List files (one entry per line) and ordered de-duplication of the names read from them."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from lomix_lightning.errors import LomixUserError

__all__ = ["read_list_file", "unique_in_order"]


def read_list_file(path: str | Path) -> list[str]:
    r"""Read a list file: one entry per line, blank lines and surrounding whitespace ignored.

    Args:
        path: Text file path.

    Returns:
        The non-empty stripped lines, in file order.

    Raises:
        FileNotFoundError: If the file does not exist (the message names it).
        ValueError: If the file has no entries.

    Example:
        >>> import tempfile, os
        >>> with tempfile.TemporaryDirectory() as d:
        ...     p = os.path.join(d, "train.txt")
        ...     _ = open(p, "w").write("case0005_slice000\n\ncase0005_slice001\n")
        ...     read_list_file(p)
        ['case0005_slice000', 'case0005_slice001']
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"list file not found: {path}")
    entries = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not entries:
        raise LomixUserError(f"list file is empty: {path}")
    return entries


def unique_in_order(values: Sequence[str]) -> list[str]:
    """Return the distinct values in first-seen order.

    Args:
        values: Strings, possibly repeated.

    Returns:
        The distinct strings, in the order they first appear.

    Example:
        >>> unique_in_order(["b", "a", "b"])
        ['b', 'a']
    """
    return list(dict.fromkeys(values))
