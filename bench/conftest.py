"""Options of the benchmark suite: ``--bench-threads N`` sets torch's intra-op threads for the run."""

import pytest
import torch


def pytest_addoption(parser):
    parser.addoption("--bench-threads", type=int, default=None,
                     help="torch.set_num_threads for the benchmarks (default: torch's default)")


@pytest.fixture(scope="session", autouse=True)
def _bench_threads(request):
    n = request.config.getoption("--bench-threads")
    if n:
        torch.set_num_threads(n)
    yield
