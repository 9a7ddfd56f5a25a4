"""Shared fixtures: a fixed random seed for every test and the dtypes the contract is checked in."""

from __future__ import annotations

import os

import pytest
import torch

DTYPES = {"float64": torch.float64, "float32": torch.float32}

# One intra-op thread for the whole run and the processes tests start, unless the caller sets
# OMP_NUM_THREADS: test tensors are small, and on a shared 2-core machine a second thread mostly
# spins at OpenMP barriers (4 test files under load: 44 s of CPU and 163 s wall at 2 threads,
# 13 s and 58 s at 1).
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(autouse=True)
def seed() -> int:
    """Seed torch's generator so every test sees the same random tensors."""
    torch.manual_seed(0)
    return 0


@pytest.fixture(params=list(DTYPES.values()), ids=list(DTYPES))
def dtype(request: pytest.FixtureRequest) -> torch.dtype:
    """Run a test in float64 (tight tolerances) and in float32 (realistic ones)."""
    return request.param


@pytest.fixture
def one_thread():
    """One intra-op thread for the test (tiny tensors or Python-bound work: a second thread only
    adds synchronisation); modules opt in with ``pytestmark = pytest.mark.usefixtures(...)``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
