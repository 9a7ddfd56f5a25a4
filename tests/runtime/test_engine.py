"""The multi-stream engine equals running every stream alone."""

from __future__ import annotations

import random

import pytest
import torch
from torch import nn

import costream as cs
from costream.runtime import StreamEngine


def _net(stride: int = 1) -> cs.CoModule:
    return cs.continual(nn.Sequential(
        nn.Conv1d(3, 6, 3, padding=1), nn.ReLU(),
        nn.Conv1d(6, 6, 3, stride=stride, padding=1, padding_mode="replicate"),
        nn.MaxPool1d(3, stride=1, padding=1),
        nn.Conv1d(6, 2, 3),
    )).double().eval()


def _solo(net: cs.CoModule, frames: list[torch.Tensor]) -> list[torch.Tensor | None]:
    net.reset_state()
    with torch.no_grad():
        out = [net.forward_step(f.unsqueeze(0)) for f in frames]
    net.reset_state()
    return [None if y is None else y[0] for y in out]


@pytest.mark.parametrize(("stride", "max_batch"), [(1, None), (2, None), (3, None), (1, 5),
                                                  (3, 5)])
def test_staggered_streams_with_resets_equal_solo_runs(stride, max_batch):
    rng = random.Random(stride)
    torch.manual_seed(stride)
    net = _net(stride)
    n_streams, steps = 64 if stride == 1 and max_batch is None else 16, 40
    engine = StreamEngine(net, capacity=n_streams, frame_shape=(3,), dtype=torch.float64,
                          max_batch=max_batch)
    start = {i: rng.randrange(0, 10) for i in range(n_streams)}
    segments: dict[int, list[list[torch.Tensor]]] = {i: [] for i in range(n_streams)}
    outputs: dict[int, list[list[torch.Tensor | None]]] = {i: [] for i in range(n_streams)}
    slot: dict[int, int] = {}
    with torch.no_grad():
        for t in range(steps):
            frames = {}
            for i in range(n_streams):
                if t == start[i]:
                    slot[i] = engine.open()
                    segments[i].append([])
                    outputs[i].append([])
                elif i in slot and rng.random() < 0.05:
                    engine.reset(slot[i])
                    segments[i].append([])
                    outputs[i].append([])
                if i in slot:
                    f = torch.randn(3, dtype=torch.float64)
                    segments[i][-1].append(f)
                    frames[slot[i]] = f
            out = engine.step(frames)
            for i, sid in slot.items():
                outputs[i][-1].append(out[sid])
    for i in range(n_streams):
        for seg, got in zip(segments[i], outputs[i], strict=True):
            want = _solo(net, seg)
            for a, b in zip(got, want, strict=True):
                assert (a is None) == (b is None)
                if a is not None:
                    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_slots_open_close_and_errors():
    engine = StreamEngine(cs.Conv1d(2, 2, 3), capacity=2, frame_shape=(2,))
    a, b = engine.open(), engine.open()
    with pytest.raises(RuntimeError, match="slots are in use"):
        engine.open()
    engine.close(a)
    with pytest.raises(KeyError, match="no open stream"):
        engine.step({a: torch.zeros(2)})
    with pytest.raises(ValueError, match="frame shape"):
        engine.step({b: torch.zeros(3)})
    assert engine.open() == a


def test_warm_streams_step_on_the_layers_fast_path(monkeypatch):
    """The module's step gets the age ``None`` once every stream of a call is past the
    network's warm-up (as ``forward_step`` does), an ``int`` for streams of one age, else the
    per-stream ages."""
    net = _net()
    seen = []
    step = net._step

    def spy(x, tree, age, phase):
        seen.append(age if age is None or isinstance(age, int) else age.tolist())
        return step(x, tree, age, phase)

    engine = StreamEngine(net, capacity=2, frame_shape=(3,), dtype=torch.float64)
    monkeypatch.setattr(net, "_step", spy)  # after the block size probe of the constructor
    a, b = engine.open(), engine.open()
    warm = net.delay + 1
    with torch.no_grad():
        for _ in range(warm + 1):
            engine.step({a: torch.randn(3, dtype=torch.float64),
                         b: torch.randn(3, dtype=torch.float64)})
        engine.reset(b)
        engine.step({a: torch.randn(3, dtype=torch.float64),
                     b: torch.randn(3, dtype=torch.float64)})
    assert seen == [*range(warm), None, [warm + 1, 0]]


def test_blocks_of_max_batch_streams_are_saved_and_restored_whole():
    net = _net()
    engine = StreamEngine(net, capacity=5, frame_shape=(3,), dtype=torch.float64, max_batch=2)
    ids = [engine.open() for _ in range(5)]
    frames = torch.randn(net.delay + 6, 5, 3, dtype=torch.float64)
    with torch.no_grad():
        for f in frames[:-3]:
            engine.step(dict(zip(ids, f, strict=True)))
        state = engine.state_dict()
        assert state["tree"][0]["psum"].shape[0] == 5
        copy = StreamEngine(net, capacity=5, frame_shape=(3,), dtype=torch.float64)
        copy.load_state_dict(state)
        for f in frames[-3:]:
            a = engine.step(dict(zip(ids, f, strict=True)))
            b = copy.step(dict(zip(ids, f, strict=True)))
            assert all(torch.equal(a[i], b[i]) for i in ids)
    with pytest.raises(ValueError, match="max_batch"):
        StreamEngine(net, capacity=2, frame_shape=(3,), max_batch=0)
