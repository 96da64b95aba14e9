"""Shared pytest options: --runslow runs the tests marked slow; tests marked cuda skip without a GPU."""

import pytest
import torch


def pytest_addoption(parser):
    """Add --runslow."""
    parser.addoption("--runslow", action="store_true", default=False, help="also run tests marked slow")


def pytest_configure(config):
    """Register the markers (also listed in pyproject.toml, so running without it still works)."""
    config.addinivalue_line("markers", "slow: long-running tests (run with --runslow)")
    config.addinivalue_line("markers", "cuda: needs a CUDA device")


def pytest_collection_modifyitems(config, items):
    """Skip slow tests unless --runslow, and cuda tests when no CUDA device is present."""
    skip_slow = pytest.mark.skip(reason="slow: run with --runslow")
    skip_cuda = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "slow" in item.keywords and not config.getoption("--runslow"):
            item.add_marker(skip_slow)
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_cuda)
