"""`lomix compare`: runs every combination once, resumes, aggregates, and tests lomix against each scheme."""

import csv
import json

import numpy as np
import pytest
from scipy.stats import wilcoxon

from lomix_lightning.cli.compare import RunResult, compare_main, run_comparison, summarise

TINY = [
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=2",
    "--trainer.limit_val_batches=1",
    "--data.init_args.num_train=16",
    "--data.init_args.num_val=8",
    "--data.init_args.num_test=8",
    "--data.init_args.image_size=32",
    "--model.init_args.network.init_args.base_channels=4",
    "--model.init_args.network.init_args.depth=3",
]


def test_summary_statistics_and_wilcoxon_against_scipy():
    rng = np.random.default_rng(0)
    results = []
    for seed in (0, 1, 2):
        for scheme, shift in (("deep_supervision", 0.0), ("lomix", 0.05)):
            cases = (rng.uniform(0.5, 0.9, 6) + shift).tolist()
            metrics = {"test/dice": float(np.mean(cases)), "test/hd95": 3.0 + seed, "test/iou": 0.5}
            results.append(RunResult(scheme, seed, None, metrics, cases))
    rows = {r["scheme"]: r for r in summarise(results)}
    ds = [r for r in results if r.scheme == "deep_supervision"]
    lomix = [r for r in results if r.scheme == "lomix"]
    assert rows["lomix"]["test/dice_mean"] == pytest.approx(np.mean([r.metrics["test/dice"] for r in lomix]))
    assert rows["lomix"]["test/hd95_std"] == pytest.approx(np.std([3.0, 4.0, 5.0]))
    expected = wilcoxon([v for r in lomix for v in r.case_dice], [v for r in ds for v in r.case_dice]).pvalue
    assert rows["deep_supervision"]["wilcoxon_p_vs_lomix"] == pytest.approx(expected)
    assert np.isnan(rows["lomix"]["wilcoxon_p_vs_lomix"])


def test_identical_runs_give_p_one():
    same = [RunResult(s, 0, None, {"test/dice": 0.5}, [0.5, 0.6]) for s in ("mutation", "lomix")]
    assert {r["scheme"]: r["wilcoxon_p_vs_lomix"] for r in summarise(same)}["mutation"] == 1.0


@pytest.mark.slow
def test_runs_resume_and_reports(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "cmp"
    results = run_comparison(["deep_supervision", "lomix"], [0, 1], output=out, extra_args=TINY)
    assert [(r.scheme, r.seed) for r in results] == [("deep_supervision", 0), ("deep_supervision", 1),
                                                     ("lomix", 0), ("lomix", 1)]  # fmt: skip
    assert all(len(r.case_dice) == 8 and 0 <= r.metrics["test/dice"] <= 1 for r in results)
    saved = json.loads((out / "full" / "lomix" / "seed_1" / "result.json").read_text())
    assert saved["metrics"] == results[3].metrics
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and {r["scheme"] for r in rows} == {"deep_supervision", "lomix"}
    assert "| all | lomix | 2 |" in (out / "results.md").read_text()
    # a second call finds every run finished: nothing is trained again
    capsys.readouterr()
    args = ["--schemes", "deep_supervision", "lomix", "--seeds", "0", "1", "--output", str(out), *TINY]
    assert compare_main(args) == 0
    assert capsys.readouterr().out.count("skip") == 4


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown schemes \\['lomx'\\]"):
        run_comparison(["lomx"], [0])
    with pytest.raises(ValueError, match="at least one seed"):
        run_comparison(["lomix"], [])


def test_weightings_are_arms_tested_against_the_papers_learned_weights(tmp_path, monkeypatch, capsys):
    import lomix_lightning.cli
    import lomix_lightning.cli.compare as compare

    rng = np.random.default_rng(1)
    real_fit_and_test = compare._fit_and_test

    def fake_fit_and_test(config, scheme, seed, fraction, directory, extra):
        cases = rng.uniform(0.4, 0.9, 5).tolist()
        return RunResult(scheme, seed, fraction, {"test/dice": float(np.mean(cases))}, cases)

    monkeypatch.setattr(compare, "_fit_and_test", fake_fit_and_test)
    out = tmp_path / "cmp"
    assert (
        compare_main(["--weightings", "uncertainty", "learned", "aligned", "--seeds", "0", "1", "--output", str(out)])
        == 0
    )
    results = [RunResult(**json.loads(p.read_text())) for p in sorted(out.glob("full/*/seed_*/result.json"))]
    assert {r.scheme for r in results} == {"lomix-learned", "lomix-aligned", "lomix-uncertainty"}
    rows = summarise(results)
    assert [r["scheme"] for r in rows] == ["lomix-learned", "lomix-aligned", "lomix-uncertainty"]
    by = {arm: [v for r in sorted(results, key=lambda r: r.seed) if r.scheme == arm for v in r.case_dice] for arm in
          ("lomix-learned", "lomix-aligned")}  # fmt: skip
    expected = wilcoxon(by["lomix-learned"], by["lomix-aligned"]).pvalue
    assert rows[1]["wilcoxon_p_vs_lomix"] == pytest.approx(expected)
    assert "Wilcoxon p (vs lomix-learned)" in (out / "results.md").read_text()

    # each arm's runs get its weighting on the command line
    seen = []

    class StopCLI(Exception):
        pass

    def fake_cli(args):
        seen.append(args)
        raise StopCLI

    monkeypatch.setattr(lomix_lightning.cli.lightning, "LoMixCLI", fake_cli)
    with pytest.raises(StopCLI):
        real_fit_and_test(None, "lomix-aligned", 0, None, tmp_path, [])
    assert "--model.init_args.weighting=aligned" in seen[0] and "--model.init_args.supervision=lomix" in seen[0]
    with pytest.raises(ValueError, match="unknown weightings \\['aligend'\\]"):
        run_comparison(["lomix"], [0], weightings=["aligend"])
