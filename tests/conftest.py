"""Fixtures shared by the tests: the devices the engine and loss tests run on."""

import pytest
import torch

DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]
"""The CPU always; a GPU when one is present (CI is CPU-only: the cuda cases are then absent, not skipped)."""


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    """Each available device in turn: the PyTorch engine's GPU path is tested wherever a GPU exists."""
    return torch.device(request.param)
