"""Fixtures shared by the tests: the devices the engine and loss tests run on.

The test helpers (tests/_fixtures.py, tests/_subprocess.py, ...) are importable from every test folder through
``pythonpath = ["tests"]`` in pyproject.toml.
"""

import pytest
import torch

import lomix_lightning._engine.native as native

DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]
"""The CPU always; a GPU when one is present (CI is CPU-only: the cuda cases are then absent, not skipped)."""


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    """Each available device in turn: the PyTorch engine's GPU path is tested wherever a GPU exists."""
    return torch.device(request.param)


@pytest.fixture(params=["native", "pytorch"])
def loss_engine(request, monkeypatch, device) -> str:
    """Each CE + Dice engine in turn, forced: ``LOMIX_NATIVE=1`` (the kernels: CPU only) or ``0`` (PyTorch)."""
    if request.param == "native" and (device.type != "cpu" or native.library() is None):
        pytest.skip("the compiled kernels run on the CPU and need a C compiler")
    monkeypatch.setenv("LOMIX_NATIVE", "1" if request.param == "native" else "0")
    return request.param


@pytest.fixture
def one_thread():
    """One intra-op thread: on a busy 2-core runner two threads per process spin against other processes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
