"""Model-zoo tests run on one thread: stepping is latency bound, and a shared CPU makes
multi-threaded small kernels slow and erratic."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
