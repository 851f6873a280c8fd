"""``lomix compare``: the paper's protocol as one command (schemes x seeds x label fractions, Wilcoxon tests)."""

from __future__ import annotations

import csv
import json
import math
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, get_args

import numpy as np
from rich.console import Console
from rich.table import Table
from scipy.stats import wilcoxon

from lomix_lightning.cli.errors import OneLineArgumentParser
from lomix_lightning.errors import LomixUserError
from lomix_lightning.losses.weighting import WeightingName

SCHEME_ORDER = ("last_layer", "deep_supervision", "mutation", "lomix")
WEIGHTING_ORDER = get_args(WeightingName)  # ("learned", "fixed", "aligned", "uncertainty")
DEMO_ARGS = ("--trainer.max_epochs=8", "--model.init_args.network.init_args.base_channels=8")
"""Without ``--config``, compare runs a lighter demo (8 epochs, a U-Net of width 8) so 12 runs fit in minutes."""
METRICS = ("test/dice", "test/hd95", "test/iou")


@dataclass
class RunResult:
    """One finished run: its test metrics and the per-case mean Dice (for paired tests)."""

    scheme: str
    seed: int
    fraction: float | None
    metrics: dict[str, float]
    case_dice: list[float] = field(default_factory=list)
    best_checkpoint: str = ""


def arm_names(schemes: Sequence[str], weightings: Sequence[str] | None) -> list[str]:
    """The compared arms: the schemes, or with ``weightings`` each ``scheme-weighting`` pair.

    Example:
        >>> arm_names(["lomix"], ["learned", "aligned"])
        ['lomix-learned', 'lomix-aligned']
    """
    unknown = [w for w in weightings or () if w not in WEIGHTING_ORDER]
    if unknown:
        raise LomixUserError(f"unknown weightings {unknown}; allowed are {list(WEIGHTING_ORDER)}")
    return list(schemes) if not weightings else [f"{s}-{w}" for s in schemes for w in weightings]


def split_arm(arm: str) -> tuple[str, str | None]:
    """``(scheme, weighting or None)`` of an arm name (``"lomix-aligned"`` or ``"lomix"``)."""
    scheme, _, weighting = arm.partition("-")
    return scheme, weighting or None


def _arm_order(arm: str) -> tuple[int, int]:
    scheme, weighting = split_arm(arm)
    return SCHEME_ORDER.index(scheme), -1 if weighting is None else WEIGHTING_ORDER.index(weighting)


def _reference(arms: Sequence[str]) -> str | None:
    """The arm every other is tested against: ``lomix``, else ``lomix-learned`` (the paper's), else none."""
    return next((arm for arm in ("lomix", "lomix-learned") if arm in arms), None)


def run_dir(output: Path, scheme: str, seed: int, fraction: float | None) -> Path:
    """Where one run writes its checkpoint, logs and ``result.json``."""
    part = "full" if fraction is None else f"fraction_{fraction:g}"
    return output / part / scheme / f"seed_{seed}"


def _fit_and_test(
    config: str | None, scheme: str, seed: int, fraction: float | None, directory: Path, extra: Sequence[str]
) -> RunResult:
    from lomix_lightning.cli.lightning import LoMixCLI

    callbacks = [
        {
            "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {"monitor": "val/dice", "mode": "max", "dirpath": str(directory / "checkpoints")},
        }
    ]
    logger = {
        "class_path": "lightning.pytorch.loggers.CSVLogger",
        "init_args": {"save_dir": str(directory), "name": "", "version": ""},
    }
    args = ["fit", *(["--config", config] if config else [])]
    scheme_name, weighting = split_arm(scheme)
    if weighting is not None:
        args.append(f"--model.init_args.weighting={weighting}")
    args += [
        f"--model.init_args.supervision={scheme_name}",
        f"--seed_everything={seed}",
        f"--trainer.default_root_dir={directory}",
        f"--trainer.callbacks={json.dumps(callbacks)}",
        f"--trainer.logger={json.dumps(logger)}",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
    ]
    if fraction is not None:
        args.append(f"--data.init_args.train_fraction={fraction}")
    cli = LoMixCLI(args=[*args, *extra])
    best = cli.trainer.checkpoint_callback.best_model_path
    cli.trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path=best or None, verbose=False)
    metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items() if k.startswith("test/")}
    case_dice = np.nanmean(cli.model.test_case_results["dice"], axis=1).tolist()
    return RunResult(scheme, seed, fraction, metrics, case_dice, best)


def run_comparison(
    schemes: Sequence[str] = SCHEME_ORDER,
    seeds: Sequence[int] = (0, 1, 2),
    fractions: Sequence[float] | None = None,
    output: str | Path = "lomix_compare",
    config: str | None = None,
    extra_args: Sequence[str] = (),
    console: Console | None = None,
    weightings: Sequence[str] | None = None,
) -> list[RunResult]:
    """Train and test every (fraction, scheme, seed), skipping runs whose ``result.json`` already exists.

    Args:
        schemes: Supervision schemes to compare.
        seeds: ``seed_everything`` values; every scheme sees the same seeds and the same test cases.
        fractions: Training-label fractions (``data.train_fraction``); ``None`` trains on all labels.
        output: Output folder (one sub-folder per run, ``results.csv`` and ``results.md``).
        config: A ``lomix`` YAML config; ``None`` uses the built-in demo.
        extra_args: More ``lomix fit`` arguments for every run (e.g. ``--trainer.max_epochs=5``).
        console: Where to print progress and the table.
        weightings: Loss weightings to compare within each scheme (``learned``, ``fixed``, ``aligned``,
            ``uncertainty``); each (scheme, weighting) pair is one arm, named ``scheme-weighting``, and the Wilcoxon
            tests are against ``lomix-learned``. ``None``: the schemes with their own weighting.

    Returns:
        One :class:`RunResult` per run.
    """
    unknown = [s for s in schemes if s not in SCHEME_ORDER]
    if unknown:
        raise LomixUserError(f"unknown schemes {unknown}; allowed are {list(SCHEME_ORDER)}")
    if not seeds:
        raise LomixUserError("give at least one seed")
    schemes = arm_names(schemes, weightings)
    console = console or Console()
    output = Path(output)
    if config is None:
        extra_args = [*DEMO_ARGS, *extra_args]
    results = []
    for fraction in [None] if not fractions else list(fractions):
        for scheme in schemes:
            for seed in seeds:
                directory = run_dir(output, scheme, seed, fraction)
                done = directory / "result.json"
                if done.is_file():
                    results.append(RunResult(**json.loads(done.read_text())))
                    console.print(f"[dim]skip {directory} (finished)[/dim]")
                    continue
                console.print(f"run {directory}")
                directory.mkdir(parents=True, exist_ok=True)
                result = _fit_and_test(config, scheme, seed, fraction, directory, extra_args)
                done.write_text(json.dumps(asdict(result), indent=2))
                results.append(result)
    write_reports(results, output, console)
    return results


def _wilcoxon(lomix: list[float], other: list[float]) -> float:
    """Two-sided Wilcoxon signed-rank p-value of paired values (1.0 when every pair is equal)."""
    x, y = np.asarray(lomix, dtype=float), np.asarray(other, dtype=float)
    keep = ~(np.isnan(x) | np.isnan(y))
    x, y = x[keep], y[keep]
    if len(x) == 0 or np.allclose(x, y):
        return 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(wilcoxon(x, y, alternative="two-sided").pvalue)


def summarise(results: Sequence[RunResult]) -> list[dict[str, Any]]:
    """One row per (fraction, scheme): mean and std over seeds of each metric, and the Wilcoxon p of lomix vs it.

    The test pairs lomix and the other scheme case by case within each seed (seeds x cases pairs).
    """
    rows = []
    fractions = sorted({r.fraction for r in results}, key=lambda f: -1 if f is None else f)
    for fraction in fractions:
        group = [r for r in results if r.fraction == fraction]
        schemes = sorted({r.scheme for r in group}, key=_arm_order)
        reference = _reference(schemes)
        by_scheme = {s: sorted((r for r in group if r.scheme == s), key=lambda r: r.seed) for s in schemes}
        for scheme in schemes:
            runs = by_scheme[scheme]
            row: dict[str, Any] = {"fraction": "all" if fraction is None else fraction, "scheme": scheme}
            row["runs"] = len(runs)
            for metric in METRICS:
                values = np.array([r.metrics.get(metric, math.nan) for r in runs], dtype=float)
                row[f"{metric}_mean"] = float(np.nanmean(values)) if len(values) else math.nan
                row[f"{metric}_std"] = float(np.nanstd(values)) if len(values) else math.nan
            row["wilcoxon_p_vs_lomix"] = math.nan
            row["reference"] = reference
            if reference is not None and scheme != reference:
                lomix_runs = {r.seed: r for r in by_scheme[reference]}
                paired = [(lomix_runs[r.seed].case_dice, r.case_dice) for r in runs if r.seed in lomix_runs]
                pairs = [(a, b) for x, y in paired for a, b in zip(x, y)]
                if pairs:
                    row["wilcoxon_p_vs_lomix"] = _wilcoxon([a for a, _ in pairs], [b for _, b in pairs])
            rows.append(row)
    return rows


def _cell(row: dict[str, Any], metric: str, scale: float = 1.0) -> str:
    mean, std = row[f"{metric}_mean"] * scale, row[f"{metric}_std"] * scale
    return "n/a" if math.isnan(mean) else f"{mean:.2f} ± {std:.2f}"


def write_reports(results: Sequence[RunResult], output: Path, console: Console | None = None) -> list[dict[str, Any]]:
    """Write ``results.csv`` (one row per run), ``results.md`` (the summary) and print the summary table."""
    output.mkdir(parents=True, exist_ok=True)
    keys = sorted({k for r in results for k in r.metrics})
    with open(output / "results.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["fraction", "scheme", "seed", *keys, "best_checkpoint"])
        for r in results:
            fraction = "all" if r.fraction is None else r.fraction
            writer.writerow([fraction, r.scheme, r.seed, *(r.metrics.get(k, "") for k in keys), r.best_checkpoint])
    rows = summarise(results)
    reference = next((row["reference"] for row in rows if row["reference"]), "lomix")
    header = f"| labels | scheme | runs | Dice (%) | HD95 | IoU (%) | Wilcoxon p (vs {reference}) |"
    lines = [header, "|---|---|---|---|---|---|---|"]
    table = Table(title="lomix compare: test metrics, mean ± std over seeds")
    for column in ("labels", "scheme", "runs", "Dice (%)", "HD95", "IoU (%)", f"Wilcoxon p vs {reference}"):
        table.add_column(column, justify="left" if column in ("labels", "scheme") else "right")
    for row in rows:
        p = row["wilcoxon_p_vs_lomix"]
        cells = [
            str(row["fraction"]),
            row["scheme"],
            str(row["runs"]),
            _cell(row, "test/dice", 100),
            _cell(row, "test/hd95"),
            _cell(row, "test/iou", 100),
            "—" if math.isnan(p) else f"{p:.3g}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
        table.add_row(*cells)
    note = (
        f"\nWilcoxon: two-sided signed-rank test of {reference} against each arm over paired (seed, test case) "
        "mean-Dice values; p < 0.05 means the schemes differ on these runs, not which is better.\n"
    )
    (output / "results.md").write_text("\n".join(lines) + "\n" + note)
    (console or Console()).print(table)
    return rows


def compare_main(argv: Sequence[str]) -> int:
    """``lomix compare [--config C] [--schemes ...] [--weightings ...] [--seeds ...] [--train-fractions ...]``."""
    parser = OneLineArgumentParser(
        prog="lomix compare",
        description="Train and test each supervision scheme over several seeds (and label fractions), then report "
        "mean ± std and Wilcoxon signed-rank tests of lomix against each scheme. Finished runs are skipped, so an "
        "interrupted comparison resumes. Unknown arguments go to every `lomix fit` run.",
    )
    parser.add_argument(
        "--config", default=None, help="lomix YAML config (default: the built-in demo, 8 epochs, U-Net width 8)"
    )
    parser.add_argument(
        "--schemes", nargs="+", default=None, choices=SCHEME_ORDER, help="default: all four; lomix with --weightings"
    )
    parser.add_argument(
        "--weightings",
        nargs="+",
        default=None,
        choices=WEIGHTING_ORDER,
        help="compare these loss weightings within each scheme (Wilcoxon against lomix-learned)",
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--train-fractions", nargs="+", type=float, default=None, help="e.g. 0.05 0.1 0.2 0.4")
    parser.add_argument("--output", default="lomix_compare", help="output folder (default: lomix_compare)")
    args, extra = parser.parse_known_args(list(argv))
    schemes = args.schemes or (["lomix"] if args.weightings else list(SCHEME_ORDER))
    run_comparison(schemes, args.seeds, args.train_fractions, args.output, args.config, extra, None, args.weightings)
    print(f"results: {Path(args.output) / 'results.csv'} and {Path(args.output) / 'results.md'}")
    return 0
