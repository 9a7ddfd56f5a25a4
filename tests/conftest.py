"""Shared fixtures: a fixed random seed for every test and the dtypes the contract is checked in."""

from __future__ import annotations

import pytest
import torch

DTYPES = {"float64": torch.float64, "float32": torch.float32}


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
