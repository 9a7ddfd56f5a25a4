"""Model-zoo tests run on one thread: stepping is latency bound, and a shared CPU makes
multi-threaded small kernels slow and erratic."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _zoo_on_one_thread(one_thread: None) -> None:
    """Every zoo test takes the shared ``one_thread`` fixture (tests/conftest.py)."""
