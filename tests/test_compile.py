"""The pure step compiles with ``torch.compile(fullgraph=True)`` and matches eager stepping."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator

import pytest
import torch
from torch import nn

import costream as cs
from costream.core import tree_map, tree_where

D = torch.float64
LIMIT_S = 240


@contextlib.contextmanager
def time_limit(seconds: int) -> Iterator[None]:
    """Fail (not hang) if the block runs longer than ``seconds``."""

    def expire(signum, frame):
        raise TimeoutError(f"compilation took longer than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _net() -> cs.Sequential:
    return cs.Sequential(
        cs.Conv1d(3, 4, 3, padding=1), nn.ReLU(),
        cs.MaxPool1d(2, stride=1),
        cs.Residual(cs.Conv1d(4, 4, 3)),
        cs.AvgPool1d(2, stride=1),
        cs.Conv1d(4, 2, 1),
    ).to(D)


@pytest.mark.slow
def test_compiled_step_matches_eager() -> None:
    net = _net()
    steps = 10
    x = torch.randn(2, 3, steps, dtype=D)
    torch._dynamo.reset()
    compiled = torch.compile(net.step, fullgraph=True)
    eager_state = net.init_state(2, (3,))
    state = net.init_state(2, (3,))
    offline = net(x)
    due = 0
    with torch.no_grad(), time_limit(LIMIT_S):
        for t in range(steps):
            y_eager, eager_state = net.step(x[:, :, t], eager_state)
            y, state = compiled(x[:, :, t], state)
            assert torch.equal(state["age"], eager_state["age"])
            ready = net.ready(state)
            assert torch.equal(ready, net.ready(eager_state))
            if not bool(ready.all()):
                continue
            torch.testing.assert_close(y, y_eager, rtol=1e-10, atol=1e-10)
            torch.testing.assert_close(y, offline[:, :, due], rtol=1e-10, atol=1e-10)
            due += 1
    assert due == steps - net.delay

    # restart stream 0 in the explicit state: the streams are now at different ages
    mask = torch.tensor([True, False])
    fresh = net.init_state(2, (3,))
    state = {"tree": tree_where(mask, fresh["tree"], state["tree"]),
             "age": torch.where(mask, fresh["age"], state["age"]), "phase": 0}
    eager_state = {**state, "tree": tree_map(torch.clone, state["tree"])}
    solo_state = net.init_state(1, (3,))
    compared = 0
    with torch.no_grad(), time_limit(LIMIT_S):
        for t in range(steps):
            y_eager, eager_state = net.step(x[:, :, t], eager_state)
            y, state = compiled(x[:, :, t], state)
            y_solo, solo_state = net.step(x[:1, :, t], solo_state)
            ready = net.ready(state)
            assert ready.tolist() == [t >= net.delay, True]
            torch.testing.assert_close(y[1], y_eager[1], rtol=1e-10, atol=1e-10)
            if bool(ready[0]):
                torch.testing.assert_close(y[:1], y_solo, rtol=1e-10, atol=1e-10)
                compared += 1
    assert compared == steps - net.delay
    torch._dynamo.reset()
