"""The README's snippet runs and prints what it says; its CI command is the one .ci/run runs."""

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
