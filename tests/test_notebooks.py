"""The notebooks: stored without outputs, and each one runs top to bottom in a fresh kernel of this interpreter."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = ("quickstart.ipynb", "weight_dynamics.ipynb", "bring_your_own_network.ipynb")
CELL_TIMEOUT_S = 300  # generous for slow CI machines; each notebook takes well under 90 s on 2 cores
KERNEL_CHECK = "import sys\nprint(repr(sys.executable))\nprint(repr(sys.prefix))"


def _read(name: str):
    return nbformat.read(NOTEBOOK_DIR / name, as_version=4)


def test_notebook_folder_holds_the_three_notebooks():
    assert sorted(p.name for p in NOTEBOOK_DIR.glob("*.ipynb")) == sorted(NOTEBOOKS)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_stored_without_outputs(name):
    notebook = _read(name)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert len(code) >= 3
    assert [i for i, cell in enumerate(code) if cell.outputs] == [], "strip the outputs before committing"
    assert [i for i, cell in enumerate(code) if cell.execution_count is not None] == [], "clear the execution counts"
    assert notebook.metadata["kernelspec"]["name"] == "python3"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_writes_its_run_files_to_a_temporary_folder(name):
    source = "\n".join(cell.source for cell in _read(name).cells if cell.cell_type == "code")
    assert "tempfile.mkdtemp(" in source
    assert "Trainer(" in source or "quick_trainer(" in source
    # every Trainer gets an explicit logger under the temporary folder and the CPU
    assert source.count("logger=CSVLogger(run_dir") >= 1
    assert 'accelerator="cpu"' in source


def _current_interpreter_kernel():
    """A kernel manager for ipykernel's own spec: the interpreter running the tests, whatever kernelspecs exist."""
    jupyter_client = pytest.importorskip("jupyter_client")
    pytest.importorskip("ipykernel")
    from jupyter_client.kernelspec import KernelSpecManager

    specs = KernelSpecManager(kernel_dirs=[], ensure_native_kernel=True)  # ipykernel's spec: [sys.executable, ...]
    return jupyter_client.AsyncKernelManager(kernel_name="python3", kernel_spec_manager=specs)


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_top_to_bottom(name, monkeypatch):
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("NO_ALBUMENTATIONS_UPDATE", "1")
    monkeypatch.setenv("WANDB_MODE", "offline")
    # One intra-op thread: as fast for these tiny models, and no OpenMP oversubscription on a shared 2-core runner
    # (measured here: 48 U-Net steps took 5-9 s with one thread, 28-166 s with two while other jobs ran).
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    notebook = _read(name)
    notebook.cells.insert(0, nbformat.v4.new_code_cell(KERNEL_CHECK))
    before = sorted(os.listdir(NOTEBOOK_DIR))
    client = nbclient.NotebookClient(
        notebook,
        km=_current_interpreter_kernel(),
        timeout=CELL_TIMEOUT_S,
        allow_errors=False,  # a failing cell raises CellExecutionError naming it
        resources={"metadata": {"path": str(NOTEBOOK_DIR)}},  # run where the notebook lives, as nbmake does
    )
    client.execute()

    check = "".join(out.get("text", "") for out in notebook.cells[0].outputs).split("\n")
    assert check[:2] == [repr(sys.executable), repr(sys.prefix)], "the kernel is not this test's interpreter"
    errors = [
        out for cell in notebook.cells if cell.cell_type == "code" for out in cell.outputs if out.output_type == "error"
    ]
    assert errors == []
    assert sorted(os.listdir(NOTEBOOK_DIR)) == before, "the notebook left files next to itself"
