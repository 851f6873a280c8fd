"""Matplotlib figures of LoMix weights (paper Figs. S.1-S.8), drawn off-screen on the Agg canvas."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm, Normalize, TwoSlopeNorm
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from lomix_lightning.losses.subsets import FAMILIES

FAMILY_LABELS: dict[str, str] = {"original": "Original", "add": "Add", "mul": "Mul", "cat": "Concat", "awf": "AWF"}
FAMILY_COLORS: dict[str, str] = {
    "original": "tab:blue",
    "add": "tab:orange",
    "mul": "tab:green",
    "cat": "tab:red",
    "awf": "tab:purple",
}
_MARKER_EPOCHS = 25  # draw point markers when there are at most this many epochs


def new_figure(width: float, height: float) -> Figure:
    """A figure on its own Agg canvas: no pyplot state, no display needed."""
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def figure_to_rgb(fig: Figure) -> np.ndarray:
    """Render a figure to a ``(H, W, 3)`` ``uint8`` array."""
    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def save_png(fig: Figure, path: Path) -> None:
    """Save a figure as a PNG (100 dpi)."""
    fig.savefig(path, format="png", dpi=100)


def _present(families: Sequence[str]) -> list[str]:
    return [family for family in FAMILIES if family in families]


def _positive(values: np.ndarray) -> np.ndarray:
    """Values for a log axis: non-positive entries become NaN (left out) instead of breaking the scale."""
    return np.where(values > 0, values, np.nan)


def _marker(epochs: Sequence[int]) -> str | None:
    return "o" if len(epochs) <= _MARKER_EPOCHS else None


def _epoch_axis(ax, epochs: Sequence[int], tight: bool = False) -> None:
    """Integer epoch ticks, and a visible range even for a single epoch (``tight``: no margin, for areas)."""
    if len(epochs) == 1:
        ax.set_xlim(epochs[0] - 0.5, epochs[0] + 0.5)
        ax.set_xticks([epochs[0]])
        return
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if tight:
        ax.set_xlim(min(epochs), max(epochs))


def plot_operator_sums(epochs: Sequence[int], history: np.ndarray, families: Sequence[str]) -> Figure:
    """Fig. S.1: each operator family's summed weight per epoch (linear and log y), plus its share of the total.

    Args:
        epochs: The ``E`` epochs recorded.
        history: ``(E, M)`` weights.
        families: The ``M`` maps' families.
    """
    present = _present(families)
    columns = np.asarray(families)
    sums = np.stack([history[:, columns == family].sum(axis=1) for family in present], axis=1)  # (E, F)
    total = sums.sum(axis=1, keepdims=True)
    share = 100.0 * np.divide(sums, total, out=np.zeros_like(sums), where=total > 0)  # (E, F)
    fig = new_figure(17, 4.8)
    axes = fig.subplots(1, 3)
    for ax, scale, title in ((axes[0], "linear", "(a) linear scale"), (axes[1], "log", "(b) log scale")):
        data = sums if scale == "linear" else _positive(sums)
        for i, family in enumerate(present):
            ax.plot(epochs, data[:, i], color=FAMILY_COLORS[family], marker=_marker(epochs), markersize=3)
        ax.set_yscale(scale)
        ax.set(title=title, xlabel="epoch", ylabel="sum of weights")
        ax.grid(True, which="major", alpha=0.3)
    colors = [FAMILY_COLORS[family] for family in present]
    if len(epochs) > 1:
        axes[2].stackplot(epochs, share.T, colors=colors, alpha=0.85)
    else:  # one epoch: a stacked bar, since an area needs two points
        bottoms = np.concatenate([[0.0], np.cumsum(share[0])[:-1]])
        axes[2].bar([epochs[0]] * len(present), share[0], bottom=bottoms, color=colors, width=0.6, alpha=0.85)
    axes[2].set(title="(c) share of the total weight", xlabel="epoch", ylabel="share (%)", ylim=(0, 100))
    for ax in axes:
        _epoch_axis(ax, epochs, tight=ax is axes[2])
    handles = [Patch(color=FAMILY_COLORS[f], label=f"{FAMILY_LABELS[f]} ({(columns == f).sum()})") for f in present]
    fig.legend(handles=handles, title="operator (maps)", loc="outside right center")
    fig.suptitle("LoMix loss weights summed per operator family")
    return fig


def _around(values: np.ndarray, centre: float) -> TwoSlopeNorm:
    """A diverging colour norm: white at ``centre``, full blue at the smallest value, full red at the largest."""
    eps = 1e-3 * centre
    low, high = float(np.nanmin(values)), float(np.nanmax(values))
    return TwoSlopeNorm(vcenter=centre, vmin=min(low, centre - eps), vmax=max(high, centre + eps))


def plot_weight_heatmap(
    epochs: Sequence[int], history: np.ndarray, names: Sequence[str], families: Sequence[str]
) -> Figure:
    """Fig. S.2: every map's weight per epoch (linear and log colour), plus its share of the total per epoch.

    All learned weights shrink together, so the third panel (each column sums to 100%; red above the uniform share
    ``1/M``, blue below) shows the ranking that the first two hide behind the common decay.
    """
    num_maps = len(names)
    epochs_arr = np.asarray(epochs, dtype=float)
    mids = (epochs_arr[1:] + epochs_arr[:-1]) / 2
    x_edges = np.concatenate([[epochs_arr[0] - 0.5], mids, [epochs_arr[-1] + 0.5]])
    y_edges = np.arange(num_maps + 1) - 0.5
    data = history.T  # (E, M) -> (M, E)
    totals = data.sum(axis=0, keepdims=True)  # (1, E)
    share = 100.0 * np.divide(data, totals, out=np.zeros_like(data), where=totals > 0)  # (M, E)
    positive = data[data > 0]
    low, high = (float(positive.min()), float(positive.max())) if positive.size else (1e-8, 1.0)
    if high < 1.001 * low:  # (nearly) constant weights, e.g. a single epoch: give the log scale a visible range
        low, high = low / 2, high * 2
    fig = new_figure(20, max(4.5, 0.19 * num_maps + 1.9))
    axes = fig.subplots(1, 3, sharey=True)
    panels = (
        ("(a) weight, linear colour scale", data, Normalize(vmin=0.0, vmax=float(data.max()) or 1.0), "weight"),
        ("(b) weight, log colour scale", _positive(data), LogNorm(vmin=low, vmax=high), "weight"),
        ("(c) share of the epoch's total", share, _around(share, 100.0 / num_maps), f"share (%), white = 1/{num_maps}"),
    )
    for ax, (title, values, norm, label) in zip(axes, panels):
        diverging = isinstance(norm, TwoSlopeNorm)
        mesh = ax.pcolormesh(x_edges, y_edges, values, norm=norm, cmap="RdBu_r" if diverging else "viridis")
        colorbar = fig.colorbar(mesh, ax=ax, label=label, pad=0.01)
        if diverging:  # both halves get ticks, however unequal their ranges
            ticks = np.concatenate(
                [np.linspace(norm.vmin, norm.vcenter, 3), np.linspace(norm.vcenter, norm.vmax, 4)[1:]]
            )
            if norm.vmax - norm.vmin < 0.01 * norm.vcenter:  # all shares (nearly) uniform: label the centre only
                ticks = np.array([norm.vcenter])
            colorbar.set_ticks(ticks, labels=[f"{tick:.3g}" for tick in ticks])
        ax.set(title=title, xlabel="epoch")
        _epoch_axis(ax, epochs)
        for row in range(1, num_maps):  # a line between operator families
            if families[row] != families[row - 1]:
                ax.axhline(row - 0.5, color="black" if diverging else "white", linewidth=1.0 if diverging else 1.2)
    axes[0].set_ylim(num_maps - 0.5, -0.5)  # first map at the top
    axes[0].set_yticks(range(num_maps), labels=names, fontsize=8 if num_maps <= 60 else 6)
    axes[0].set_ylabel("supervised map")
    for label, family in zip(axes[0].get_yticklabels(), families):
        label.set_color(FAMILY_COLORS.get(family, "black"))
    handles = [Patch(color=FAMILY_COLORS[f], label=FAMILY_LABELS[f]) for f in _present(families)]
    fig.legend(handles=handles, title="y label colour", loc="outside right center")
    fig.suptitle(
        f"LoMix loss weights of {'all ' if num_maps > 1 else ''}{num_maps} map{'s' * (num_maps > 1)} per epoch"
    )
    return fig


def plot_family_weights(
    epochs: Sequence[int], history: np.ndarray, names: Sequence[str], families: Sequence[str], family: str
) -> Figure:
    """Figs. S.3-S.7: one line per map of one operator family, linear and log y (line style = subset size)."""
    index = [i for i, f in enumerate(families) if f == family]
    if not index:
        raise ValueError(f"no map of family {family!r}; present families are {_present(families)}")
    palette = colormaps["tab10" if len(index) <= 10 else "tab20" if len(index) <= 20 else "turbo"]
    styles = {1: "-", 2: "-", 3: "--", 4: ":"}
    columns = legend_columns(len(index))
    fig = new_figure(14 + 1.6 * columns, 5.0 if len(index) <= 16 else 6.5)
    axes = fig.subplots(1, 2)
    lines = []
    for ax, scale, title in ((axes[0], "linear", "(a) linear scale"), (axes[1], "log", "(b) log scale")):
        for k, i in enumerate(index):
            data = history[:, i] if scale == "linear" else _positive(history[:, i])
            size = names[i].count(",") + 1
            color = palette(k) if palette.N < 256 else palette(k / max(1, len(index) - 1))
            (line,) = ax.plot(
                epochs, data, color=color, linestyle=styles.get(size, "-."), marker=_marker(epochs), markersize=3
            )
            if scale == "linear":
                lines.append(Line2D([], [], color=color, linestyle=line.get_linestyle(), label=names[i]))
        ax.set_yscale(scale)
        ax.set(title=title, xlabel="epoch", ylabel="weight")
        _epoch_axis(ax, epochs)
        ax.grid(True, which="major", alpha=0.3)
    fig.legend(handles=lines, title="map", loc="outside right center", ncols=columns, fontsize=9)
    fig.suptitle(f"LoMix loss weights of the {FAMILY_LABELS.get(family, family)} maps ({len(index)})")
    return fig


def plot_weight_bars(
    names: Sequence[str],
    families: Sequence[str],
    weights: Sequence[float],
    title: str,
    shares: Sequence[float] | None = None,
) -> Figure:
    """Fig. S.8: one horizontal bar per map, largest on top, coloured by family and labelled with its share.

    Args:
        names: Map names.
        families: Their families.
        weights: Their weights.
        title: Figure title.
        shares: Each map's share of the total (pass it when only the top maps are drawn); default
            ``weights / sum(weights)``.
    """
    order = sorted(range(len(names)), key=lambda i: -float(weights[i]))
    total = float(sum(weights))
    if shares is None:
        shares = [float(w) / total if total > 0 else 0.0 for w in weights]
    fig = new_figure(10, max(3.0, 0.24 * len(order) + 1.6))
    ax = fig.subplots()
    values = [float(weights[i]) for i in order]
    ax.barh(range(len(order)), values, color=[FAMILY_COLORS.get(families[i], "gray") for i in order], height=0.75)
    ax.set_yticks(range(len(order)), labels=[names[i] for i in order], fontsize=8 if len(order) <= 60 else 6)
    ax.set_ylim(len(order) - 0.4, -0.6)  # largest at the top
    peak = max(values) if values else 1.0
    for row, i in enumerate(order):
        ax.text(values[row] + 0.01 * peak, row, f"{100.0 * shares[i]:.1f}%", va="center", fontsize=7)
    ax.set_xlim(0, 1.12 * peak if peak > 0 else 1.0)
    ax.set(xlabel="weight (bar label: share of the total)", ylabel="supervised map", title=title)
    ax.grid(True, axis="x", alpha=0.3)
    present = [f for f in _present(families) if f in {families[i] for i in order}]
    handles = [Patch(color=FAMILY_COLORS[f], label=FAMILY_LABELS[f]) for f in present]
    fig.legend(handles=handles, title="operator", loc="outside right upper")
    return fig


def legend_columns(count: int, per_column: int = 16) -> int:
    """Columns a legend of ``count`` entries needs at ``per_column`` entries each.

    Example:
        >>> legend_columns(11), legend_columns(26)
        (1, 2)
    """
    return max(1, math.ceil(count / per_column))
