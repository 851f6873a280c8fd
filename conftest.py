"""Test and doctest set-up shared by tests/ and the package doctests."""

import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _doctest_namespace(doctest_namespace):
    doctest_namespace["torch"] = torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    """The compiled kernels' doctests need them built (a C compiler), like ``needs_native`` in tests/test_native.py."""
    native = [i for i in items if isinstance(i, pytest.DoctestItem) and i.name == "lomix_lightning._engine.native"]
    if native:
        from lomix_lightning._engine.native import library

        if library() is None:
            for item in native:
                item.add_marker(pytest.mark.skip(reason="no C compiler: the native kernels are not built"))
