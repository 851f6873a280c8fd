"""The README's snippet runs and prints what it says; its CI command is the one .ci/run runs."""

import json
import re
from pathlib import Path

README = (Path(__file__).parents[1] / "README.md").read_text()


def _block_after(marker: str) -> str:
    match = re.search(re.escape(marker) + r"\s*```(?:python|bash)\n(.*?)```", README, re.S)
    assert match, f"README has no code block after {marker}"
    return match.group(1)


def test_readme_snippet_runs(capsys):
    exec(compile(_block_after("<!-- test:snippet -->"), "README.md", "exec"), {})
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("48 ['P1', 'P2', 'P3', 'P4', 'add(1,2)', 'add(1,3)']")
    assert out[1].startswith("torch.Size([48]) 0.693")


def test_ci_command_installs_and_tests():
    command = _block_after("<!-- ci:test -->").strip()
    assert re.fullmatch(r'pip install -e "\.\[dev\]" && pytest.*', command)


def _performance_rows() -> dict[str, list[str]]:
    section = README.split("## Performance\n", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) == 4:
            rows[cells[0]] = cells[1:]
    return rows


def test_readme_performance_table_matches_the_benchmark_results():
    rows = _performance_rows()
    results = Path(__file__).parents[1] / "benchmarks" / "results"
    for column, name in enumerate(("cpu.json", "cpu_run2.json")):
        result = json.loads((results / name).read_text())
        assert result["machine"]["native_kernels"]
        ratios = result["ratios"]
        expected = {
            "loss fwd+bwd: `LoMixLoss` (48 maps)": f"{ratios['loss_speedup_vs_loop']:.1f}x faster",
            "training step: lomix": f"{ratios['step_lomix_over_deep_supervision']:.2f}x",
            "peak memory of the step: deep supervision / lomix": f"{ratios['memory_lomix_over_deep_supervision']:.2f}x",
            "peak memory, lomix with `memory_efficient=True`": (
                f"{ratios['memory_lomix_memory_efficient_over_deep_supervision']:.2f}x"
            ),
        }
        for row, text in expected.items():
            assert text in rows[row][column], (name, row, rows[row][column], text)
