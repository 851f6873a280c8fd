"""Draw docs/images/lomix_method.png, the method figure of the README (run: python docs/make_method_figure.py)."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

COLOURS = {"original": "#1f77b4", "add": "#ff7f0e", "mul": "#2ca02c", "cat": "#d62728", "awf": "#9467bd"}


def box(ax, x, y, w, h, text, colour="#eeeeee", size=10, weight="normal"):
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.02,rounding_size=0.08", fc=colour, ec="#333333"))
    ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=size, weight=weight, wrap=True)


def arrow(ax, x0, y0, x1, y1):
    ax.add_patch(FancyArrowPatch((x0, y0), (x1, y1), arrowstyle="-|>", mutation_scale=14, color="#333333", lw=1.2))


def main(path: Path) -> None:
    fig, ax = plt.subplots(figsize=(14, 6.2))
    ax.set_xlim(0, 14.1)
    ax.set_ylim(0, 6.2)
    ax.axis("off")
    ax.set_title(
        "LoMix: supervise every fused subset of the decoder's logit maps, with learned loss weights", fontsize=13
    )
    box(ax, 0.2, 2.3, 1.6, 1.6, "image\nX", "#f5f5f5", 11)
    box(ax, 2.2, 1.2, 2.0, 3.8, "U-shaped\nnetwork\n(encoder +\ndecoder)", "#dde7f3", 11, "bold")
    arrow(ax, 1.8, 3.1, 2.2, 3.1)
    for i in range(4):
        y = 4.6 - i * 1.1
        box(ax, 4.7, y, 1.3, 0.75, f"P{i + 1}", COLOURS["original"] + "55", 11)
        arrow(ax, 4.2, 3.1, 4.7, y + 0.37)
    ax.text(5.35, 0.75, "L logit maps, coarse → fine\n(P_L is the prediction)", ha="center", fontsize=9)
    box(ax, 6.5, 0.9, 3.5, 4.6, "", "#fafafa")
    ax.text(8.25, 5.15, "Combinatorial Mutation Module", ha="center", fontsize=11, weight="bold")
    ax.text(8.25, 4.75, "every subset S, |S| ≥ 2  (11 for L = 4)", ha="center", fontsize=9)
    ops = [
        ("add", r"$\sum_{i\in S} P_i$"),
        ("mul", r"$\prod_{i\in S} P_i$"),
        ("cat", r"$W_S\,[P_i]_{i\in S}$ (learned 1×1)"),
        ("awf", r"$\sum_{i\in S} \mathrm{softmax}_i(W'_S [P_j]_{j\in S})\,P_i$"),
    ]
    for k, (op, formula) in enumerate(ops):
        y = 3.85 - k * 0.85
        box(ax, 6.65, y, 3.2, 0.65, f"{op}:  {formula}", COLOURS[op] + "55", 9)
    for i in range(4):
        arrow(ax, 6.0, 4.97 - i * 1.1, 6.5, 3.2)
    box(ax, 10.3, 3.3, 1.7, 1.6, "4 + 4×11 = 48\nsupervised maps", "#f5f5f5", 10)
    arrow(ax, 10.0, 3.2, 10.3, 4.0)
    box(
        ax,
        10.3,
        1.1,
        1.8,
        1.7,
        "$w_u = \\mathrm{softplus}(\\alpha_u)$\n$\\alpha_u \\leftarrow 0$, learned\nwith the network",
        "#fff3c4",
        9,
    )
    box(
        ax,
        12.35,
        2.2,
        1.6,
        1.8,
        "$\\mathcal{L} = \\sum_u w_u\\,\\mathcal{L}_u$\n\n$\\mathcal{L}_u$ = 0.3 CE\n+ 0.7 Dice",
        "#e6f4e6",
        10,
    )
    arrow(ax, 12.0, 4.1, 12.35, 3.4)
    arrow(ax, 12.1, 1.95, 12.35, 2.6)
    ax.text(7.0, 0.2, "Training only: inference runs the bare network and predicts with P_L (or Σ P_i), at zero extra cost.",
            ha="center", fontsize=10, style="italic")  # fmt: skip
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


if __name__ == "__main__":
    main(Path(__file__).parent / "images" / "lomix_method.png")
