"""Recycling positional encoding: position ``(t + offset) mod K``, offline and stepping."""

from __future__ import annotations

import math

import pytest
import torch

import costream as cs
from costream.testing import assert_streaming_equivalent


@pytest.mark.parametrize("learned", [True, False])
@pytest.mark.parametrize("offset", [0, 3])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_positions_recycle_offline_and_stepping(learned, offset, dtype):
    torch.manual_seed(0)
    pe = cs.RecyclingPositionalEncoding(6, 5, learned=learned, offset=offset).to(dtype)
    x = torch.randn(3, 6, 13, dtype=dtype)
    positions = (torch.arange(13) + offset) % 5
    ref = x + pe.weight[positions].t()
    assert_streaming_equivalent(pe, x, ref, rtol=0, atol=0)
    torch.testing.assert_close(pe(x)[:, :, 5:10], pe(x)[:, :, :5] - x[:, :, :5] + x[:, :, 5:10])


def test_fixed_table_is_sinusoidal_and_not_saved():
    pe = cs.RecyclingPositionalEncoding(4, 127, learned=False).double()
    assert pe.state_dict() == {}
    t, i = 9, 1
    assert math.isclose(float(pe.weight[t, 2 * i]), math.sin(t / 10000 ** (2 * i / 4)))
    assert math.isclose(float(pe.weight[t, 2 * i + 1]), math.cos(t / 10000 ** (2 * i / 4)))
    learned = cs.RecyclingPositionalEncoding(4, 64)
    assert list(learned.state_dict()) == ["weight"] and learned.weight.requires_grad


def test_counter_is_per_stream_state_and_spatial_frames():
    pe = cs.RecyclingPositionalEncoding(3, 4, offset=1).double()
    x = torch.randn(2, 3, 7, 5, dtype=torch.float64)  # (B, d, T, S)
    assert_streaming_equivalent(pe, x, x + pe.weight[(torch.arange(7) + 1) % 4].t()[..., None])
    state = pe.init_state(2, (3, 5))
    for _ in range(6):
        _, state = pe.step(x[:, :, 0], state)
    assert state["tree"]["pos"].tolist() == [2, 2]  # 6 mod 4


def test_filler_frames_do_not_advance_positions():
    """Behind a conv the encoding sees warm-up filler; positions count the conv's outputs."""
    torch.manual_seed(1)
    conv = cs.Conv1d(3, 3, 4).double()
    pe = cs.RecyclingPositionalEncoding(3, 5, learned=False).double()
    net = cs.Sequential(conv, pe)
    x = torch.randn(3, 3, 14, dtype=torch.float64)
    assert_streaming_equivalent(net, x, lambda v: pe(conv(v)))
    with pytest.raises(ValueError, match="num_positions"):
        cs.RecyclingPositionalEncoding(3, 0)
