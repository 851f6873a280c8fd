"""What drives ``aligned`` weights: the probed alignment of each map's gradient with the main map's, as scalars."""

from __future__ import annotations

from collections.abc import Sequence

from lomix_lightning.losses.subsets import FAMILIES


def alignment_metrics(
    names: Sequence[str], families: Sequence[str], alignment: Sequence[float], per_map: bool
) -> dict[str, float]:
    """``lomix/alignment/<map>`` (if ``per_map``) and ``lomix/alignment_family/<family>`` (the family's mean).

    The alignment is ``<g_u, g_main> / |g_main|^2`` clipped to ``[-1, 1]``
    (:class:`~lomix_lightning.losses.aligned.AlignedWeighting`): 1 agrees with the main map, below 0 conflicts.

    Example:
        >>> metrics = alignment_metrics(["P1", "P2", "add(1,2)"], ["original", "original", "add"], [0.5, 1.0, -0.25],
        ...                             per_map=True)
        >>> metrics["lomix/alignment/add(1,2)"], metrics["lomix/alignment_family/original"]
        (-0.25, 0.75)
    """
    if not len(names) == len(families) == len(alignment):
        raise ValueError(f"got {len(names)} names, {len(families)} families and {len(alignment)} alignments")
    metrics = {f"lomix/alignment/{name}": float(a) for name, a in zip(names, alignment)} if per_map else {}
    for family in FAMILIES:
        values = [float(a) for a, f in zip(alignment, families) if f == family]
        if values:
            metrics[f"lomix/alignment_family/{family}"] = sum(values) / len(values)
    return metrics
