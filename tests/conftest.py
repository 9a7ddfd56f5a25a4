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
