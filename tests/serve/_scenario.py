"""Many streams with staggered joins, leaves and resets, driven through any serving API, and
the reference: each stream run alone with ``forward_step``."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from typing import Any

import torch
from torch import nn

import costream as cs


def strided_net() -> cs.CoModule:
    """A stride-2 network (streams at different phases step in separate calls)."""
    torch.manual_seed(0)
    return cs.continual(nn.Sequential(
        nn.Conv1d(3, 6, 3, padding=1), nn.ReLU(),
        nn.Conv1d(6, 6, 3, stride=2, padding=1, padding_mode="replicate"),
        nn.MaxPool1d(2, stride=1), nn.Conv1d(6, 2, 3))).double().eval()


def transformer_net() -> cs.CoModule:
    """A 2-layer continual transformer encoder over a window of 5 tokens of width 8."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
    source = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    return cs.continual(source, temporal_window=5).double().eval()


NETS = {"strided": (strided_net, (3,)), "transformer": (transformer_net, (8,))}


class Script:
    """What every stream does at each tick: ``plan[t][i]`` is ``"open"``, ``"reset"``,
    ``"close"`` or ``None`` (then a frame, if the stream is open)."""

    def __init__(self, streams: int, ticks: int, frame_shape: tuple[int, ...], seed: int = 0):
        rng = random.Random(seed)
        gen = torch.Generator().manual_seed(seed)
        self.streams, self.ticks = streams, ticks
        self.plan: list[list[str | None]] = [[None] * streams for _ in range(ticks)]
        for i in range(streams):
            start = rng.randrange(0, ticks // 3)
            end = rng.randrange(2 * ticks // 3, ticks + 3)  # >= ticks: never closed
            self.plan[start][i] = "open"
            for t in range(start + 2, min(end, ticks)):
                if rng.random() < 0.04:
                    self.plan[t][i] = "reset"
            if end < ticks:
                self.plan[end][i] = "close"
        self.frames = torch.randn(ticks, streams, *frame_shape, dtype=torch.float64,
                                  generator=gen)


async def drive(script: Script, open_: Callable[[], Awaitable[Any]],
                send: Callable[[Any, torch.Tensor], Awaitable[Any]],
                reset: Callable[[Any], Awaitable[Any]], close: Callable[[Any], Awaitable[Any]],
                on_tick: Callable[[int], Awaitable[None]] | None = None,
                ) -> dict[int, list[list[Any]]]:
    """Run ``script``; return per stream the outputs of each segment (open or reset to the
    next reset or close), frames of all open streams sent concurrently at each tick."""
    keys: dict[int, Any] = {}
    outputs: dict[int, list[list[Any]]] = {i: [] for i in range(script.streams)}
    for t in range(script.ticks):
        if on_tick is not None:
            await on_tick(t)
        control = []
        for i, what in enumerate(script.plan[t]):
            if what == "open":
                control.append((i, what, open_()))
            elif what == "reset":
                control.append((i, what, reset(keys[i])))
            elif what == "close":
                control.append((i, what, close(keys.pop(i))))
        done = await asyncio.gather(*[c for _, _, c in control])
        for (i, what, _), result in zip(control, done):
            if what == "open":
                keys[i] = result
            if what in ("open", "reset"):
                outputs[i].append([])
        live = sorted(keys)
        outs = await asyncio.gather(*[send(keys[i], script.frames[t, i]) for i in live])
        for i, y in zip(live, outs):
            outputs[i][-1].append(y)
    for i in list(keys):
        await close(keys.pop(i))
    return outputs


def solo(net: cs.CoModule, script: Script) -> dict[int, list[list[Any]]]:
    """The reference: each segment of each stream alone through ``forward_step``."""
    ref: dict[int, list[list[Any]]] = {i: [] for i in range(script.streams)}
    open_ = set()
    with torch.no_grad():
        for t in range(script.ticks):
            for i, what in enumerate(script.plan[t]):
                if what in ("open", "reset"):
                    ref[i].append([])
                    open_.add(i)
                elif what == "close":
                    open_.discard(i)
            for i in sorted(open_):
                ref[i][-1].append(script.frames[t, i])
    out: dict[int, list[list[Any]]] = {}
    for i, segments in ref.items():
        out[i] = []
        for frames in segments:
            net.reset_state()
            ys = [net.forward_step(f.unsqueeze(0)) for f in frames]
            out[i].append([None if y is None else y[0] for y in ys])
        net.reset_state()
    return out


def assert_same(got: dict[int, list[list[Any]]], want: dict[int, list[list[Any]]]) -> int:
    """Every frame got exactly one response, equal to the reference (float64, 1e-12);
    returns the number of outputs compared."""
    compared = 0
    assert got.keys() == want.keys()
    for i in want:
        assert len(got[i]) == len(want[i]), f"stream {i}: segments differ"
        for g, w in zip(got[i], want[i]):
            assert len(g) == len(w), f"stream {i}: {len(g)} responses for {len(w)} frames"
            for a, b in zip(g, w):
                assert (a is None) == (b is None), f"stream {i}: output due differs"
                if b is not None:
                    torch.testing.assert_close(torch.as_tensor(a), b, rtol=1e-12, atol=1e-12)
                    compared += 1
    return compared
