"""Shared pytest options and fixtures: --runslow runs the tests marked slow; tests marked cuda skip without a GPU;
the tiny training runs that test_checkpoint.py, test_resume.py and test_train.py compare against (made once)."""

import pytest
import torch

from haframe_ext.train import TrainConfig, train
from helpers import cli, toy_config, write_inputs


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


@pytest.fixture(scope="session")
def baseline(tmp_path_factory):
    """One uninterrupted run through the CLI."""
    tmp = tmp_path_factory.mktemp("baseline")
    cfg = write_inputs(tmp)
    p = cli("train", "--config", cfg, "--out", tmp / "run")
    assert p.returncode == 0, p.stderr
    return tmp / "run"


@pytest.fixture(scope="session")
def _two_epochs_master(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("two_epochs")
    folder = tmp / "in"
    write_inputs(folder)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the CLI runs (OMP_NUM_THREADS=1): bit-exactness needs the same thread count
    try:
        train(TrainConfig.from_dict(dict(toy_config(folder), out=str(tmp / "run"), stop_after_epochs=2)))
    finally:
        torch.set_num_threads(threads)
    return folder, tmp / "run"


@pytest.fixture
def two_epochs(_two_epochs_master, tmp_path):
    """A run stopped after 2 of 3 epochs (a fresh copy per test): last.pt (epoch 2) and prev.pt (epoch 1)."""
    import shutil

    folder, master = _two_epochs_master
    out = tmp_path / "run"
    shutil.copytree(master, out)
    return TrainConfig.from_dict(dict(toy_config(folder), out=str(out), stop_after_epochs=2)), out
