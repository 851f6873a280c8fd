"""Seeded, reproducible splits: whole-case subsets for limited-label training, and ratio splits of a file list."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np

from lomix_lightning.errors import LomixUserError

__all__ = ["check_split_ratios", "count_for_fraction", "select_cases", "split_by_ratio"]


def count_for_fraction(fraction: float, total: int) -> int:
    """Number of items that ``fraction`` of ``total`` stands for: round half up, at least 1.

    On the 18 Synapse training scans this gives the paper's Table 3 sizes: 5% -> 1, 10% -> 2, 20% -> 4, 40% -> 7.

    Args:
        fraction: In ``(0, 1]``.
        total: Number of items (>= 1).

    Returns:
        ``max(1, floor(fraction * total + 0.5))``.

    Raises:
        ValueError: If ``fraction`` is outside ``(0, 1]`` or ``total < 1``.

    Example:
        >>> [count_for_fraction(f, 18) for f in (0.05, 0.1, 0.2, 0.4, 1.0)]
        [1, 2, 4, 7, 18]
    """
    if not 0.0 < fraction <= 1.0:
        raise LomixUserError(f"`fraction` must be in (0, 1], got {fraction!r}")
    if total < 1:
        raise LomixUserError(f"`total` must be >= 1, got {total!r}")
    # The small epsilon keeps e.g. 0.05 * 10 = 0.5000000000000001 or 0.35 * 10 = 3.4999999999999996 on the right side.
    return max(1, math.floor(fraction * total + 0.5 + 1e-9))


def select_cases(
    cases: Sequence[str], fraction: float, seed: int, exclude: Sequence[str] = (), total: int | None = None
) -> list[str]:
    """Pick a seeded subset of whole cases (scans) for limited-label training.

    The count is :func:`count_for_fraction` of ``total`` (default: ``len(cases)``, i.e. the fraction refers to the
    full training list, as in the paper). The cases are drawn from ``cases`` minus ``exclude`` (e.g. the validation
    cases) with a seeded permutation, so for one seed a smaller fraction is always a subset of a larger one. If the
    count exceeds the cases left after exclusion, all of them are used (with a warning).

    Args:
        cases: Candidate case names (duplicates are ignored).
        fraction: In ``(0, 1]``.
        seed: Seed of the permutation.
        exclude: Cases never selected.
        total: The number the fraction refers to; defaults to the number of distinct ``cases``.

    Returns:
        The selected case names, sorted.

    Raises:
        ValueError: If ``fraction`` is outside ``(0, 1]`` or no case is left after exclusion.

    Example:
        >>> cases = [f"case{i:04d}" for i in range(18)]
        >>> len(select_cases(cases, 0.4, seed=0))
        7
        >>> set(select_cases(cases, 0.1, seed=3)) <= set(select_cases(cases, 0.2, seed=3))
        True
    """
    distinct = sorted(set(cases))
    excluded = set(exclude)
    pool = [c for c in distinct if c not in excluded]
    if not pool:
        raise LomixUserError(
            f"no case left to select from: all {len(distinct)} cases are excluded ({sorted(excluded)})"
        )
    count = count_for_fraction(fraction, len(distinct) if total is None else total)
    if count > len(pool):
        warnings.warn(
            f"fraction {fraction} asks for {count} cases but only {len(pool)} are available after excluding "
            f"{sorted(excluded & set(distinct))}; using all {len(pool)}",
            stacklevel=2,
        )
        count = len(pool)
    order = np.random.default_rng(seed).permutation(len(pool))
    return sorted(pool[i] for i in order[:count])


def check_split_ratios(ratios: Sequence[float]) -> None:
    """Raise ``ValueError`` unless ``ratios`` is three non-negative numbers summing to 1.

    Args:
        ratios: ``(train, val, test)``.

    Raises:
        ValueError: Otherwise.

    Example:
        >>> check_split_ratios((0.8, 0.1, 0.1))
    """
    if len(ratios) != 3 or any(r < 0 for r in ratios) or not math.isclose(sum(ratios), 1.0, abs_tol=1e-6):
        raise LomixUserError(
            f"`splits` must be three non-negative ratios (train, val, test) summing to 1, got {ratios!r}"
        )


def split_by_ratio(items: Sequence[str], ratios: Sequence[float], seed: int) -> tuple[list[str], list[str], list[str]]:
    """Split ``items`` into train/val/test by ``ratios`` with a seeded shuffle.

    The validation and test sizes are ``round-half-up(ratio * n)`` (at least 1 when the ratio is positive and there
    are at least 3 items); the training split gets the rest. The input order does not matter (items are sorted
    before shuffling).

    Args:
        items: Distinct names (e.g. file stems).
        ratios: ``(train, val, test)``, each >= 0, summing to 1.
        seed: Shuffle seed.

    Returns:
        ``(train, val, test)``, each sorted.

    Raises:
        ValueError: If ``ratios`` is not three non-negative numbers summing to 1, or a positive training ratio
            would give an empty training split.

    Example:
        >>> train, val, test = split_by_ratio([f"im{i}" for i in range(10)], (0.8, 0.1, 0.1), seed=42)
        >>> len(train), len(val), len(test)
        (8, 1, 1)
    """
    check_split_ratios(ratios)
    ordered = sorted(items)
    n = len(ordered)

    def size(ratio: float) -> int:
        if ratio == 0:
            return 0
        count = math.floor(ratio * n + 0.5 + 1e-9)
        return max(count, 1) if n >= 3 else count

    n_val, n_test = size(ratios[1]), size(ratios[2])
    n_train = n - n_val - n_test
    if n_train < 0 or (ratios[0] > 0 and n_train < 1):
        raise LomixUserError(f"split {tuple(ratios)} of {n} items leaves no training item")
    order = np.random.default_rng(seed).permutation(n)
    shuffled = [ordered[i] for i in order]
    return sorted(shuffled[:n_train]), sorted(shuffled[n_train : n_train + n_val]), sorted(shuffled[n_train + n_val :])
