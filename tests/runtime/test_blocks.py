"""The engine's automatic block size follows the activations of one batched step."""

from __future__ import annotations

import pytest
import torch

import costream as cs
from costream.runtime import StreamEngine, _blocks


def _video() -> cs.CoModule:
    torch.manual_seed(0)
    return cs.Sequential(cs.Conv3d(2, 8, (2, 3, 3), padding=(0, 1, 1)), torch.nn.ReLU(),
                         cs.Conv3d(8, 4, (2, 1, 1))).eval()


def test_activation_bytes_grow_with_the_frame_not_with_the_weights():
    """Per stream, the largest tensor of a step lies between one output frame of the widest
    layer (8 channels) and all its taps (2 per frame), and quadruples with the frame area."""
    net = _video()
    small = _blocks.activation_bytes(net, (2, 16, 16))
    large = _blocks.activation_bytes(net, (2, 32, 32))
    frame = 8 * 16 * 16 * 4
    assert frame <= small <= 2 * frame
    assert large == 4 * small
    assert _blocks.activation_bytes(cs.Conv1d(4, 8, 3), (4,)) < 2**10  # weights not counted


def test_activation_bytes_see_the_layers_after_a_warming_one():
    """The first step of a fresh stream stops at a layer still warming up; the largest
    activation here comes after it (64 channels out of a 1x1x1 conv)."""
    net = cs.Sequential(cs.Conv3d(2, 2, (3, 1, 1)), torch.nn.ReLU(),
                        cs.Conv3d(2, 64, 1)).eval()
    assert _blocks.activation_bytes(net, (2, 8, 8)) >= 64 * 8 * 8 * 4


def test_auto_block_size_keeps_calls_under_the_budget_and_steps_exactly(monkeypatch):
    net = _video()
    per_stream = _blocks.activation_bytes(net, (2, 16, 16))
    assert StreamEngine(net, 10, (2, 16, 16)).max_batch == 10  # far under 32 MiB: one block
    monkeypatch.setattr(_blocks, "BLOCK_BYTES", int(3.5 * per_stream))
    auto = StreamEngine(net, 10, (2, 16, 16))
    assert auto.max_batch == 3  # 3 fit; 10 streams need 4 blocks: 3, 3, 3, 1
    whole = StreamEngine(net, 10, (2, 16, 16), max_batch=None)
    ids = [(auto.open(), whole.open()) for _ in range(10)]
    gen = torch.Generator().manual_seed(1)
    with torch.inference_mode():
        for _ in range(4):
            frames = [torch.randn(2, 16, 16, generator=gen) for _ in ids]
            a = auto.step({i: f for (i, _), f in zip(ids, frames)})
            b = whole.step({j: f for (_, j), f in zip(ids, frames)})
            for i, j in ids:
                assert (a[i] is None) == (b[j] is None)
                if a[i] is not None:
                    torch.testing.assert_close(a[i], b[j], rtol=1e-6, atol=1e-6)


def test_max_batch_refuses_other_words():
    with pytest.raises(ValueError, match="max_batch must be >= 1, None or 'auto'"):
        StreamEngine(cs.Conv1d(2, 2, 3), 4, (2,), max_batch="big")
