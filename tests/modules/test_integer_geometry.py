"""Geometry given as numpy integers (as PyTorchVideo builds it) streams like Python ints."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import costream as cs
from costream.testing import assert_streaming_equivalent

D = torch.float64


def _np(*v: int) -> tuple:
    return tuple(np.int64(i) for i in v)


def _block() -> tuple[nn.Module, cs.CoModule]:
    """A strided residual stage, its shortcut and its pool with numpy-integer geometry."""
    torch.manual_seed(0)
    body = nn.Conv3d(2, 3, kernel_size=_np(3, 1, 1), stride=_np(2, 1, 1),
                     padding=_np(1, 0, 0)).to(D)
    short = nn.Conv3d(2, 3, kernel_size=1, stride=_np(2, 1, 1)).to(D)
    pool = nn.MaxPool3d(kernel_size=_np(2, 1, 1), stride=_np(1, 1, 1))

    class Block(nn.Module):
        def forward(self, x):
            return pool(body(x) + short(x))

    co = cs.Sequential(cs.Residual(cs.continual(body), cs.continual(short)), cs.continual(pool))
    return Block(), co


def test_numpy_geometry_becomes_python_ints() -> None:
    _, co = _block()
    conv, pool = co[0].get_submodule("0"), co[1]
    for value in (*conv.kernel_size, *conv.stride, *conv.padding, *conv.dilation,
                  *conv._reversed_padding_repeated_twice, *pool.kernel_size, *pool.stride,
                  *co.temporal.__dict__.values()):
        assert type(value) is int
    assert type(cs.Conv1d(2, 2, np.int32(3), stride=np.int16(2)).temporal.stride) is int
    assert type(cs.AvgPool1d(np.int64(3)).temporal.receptive_field) is int


def test_numpy_geometry_streams_in_chunks() -> None:
    src, co = _block()
    x = torch.randn(2, 2, 11, 2, 2, dtype=D)
    with torch.no_grad():
        expected = src(x)
        # chunked stepping failed here with a bare "branch emissions out of step"
        got = torch.cat([co.forward_steps(x[:, :, :4]), co.forward_steps(x[:, :, 4:])], 2)
    co.reset_state()
    n = got.shape[2]
    torch.testing.assert_close(got, expected[:, :, :n], rtol=1e-10, atol=1e-10)
    assert_streaming_equivalent(co, x, src)


def test_non_integer_geometry_is_refused_with_its_name() -> None:
    with pytest.raises(TypeError, match=r"stride must be an integer, got 1\.5"):
        cs.Temporal(3, 1.5)


def test_branches_out_of_step_raise_a_readable_error() -> None:
    class Lying(cs.Conv1d):  # reports no padding, but pads: its outputs come one frame early
        def _temporal(self) -> cs.Temporal:
            return cs.Temporal(3, 2, 0, 0)

    res = cs.Residual(Lying(2, 2, 3, stride=2, padding=1), cs.Conv1d(2, 2, 1, stride=2))
    x = torch.randn(1, 2, 9)
    with torch.no_grad(), pytest.raises(RuntimeError, match=r"Residual: branch outputs do not "
                                        r"line up.*branch '0' \(Lying"):
        res.forward_steps(x[:, :, :4])
        res.forward_steps(x[:, :, 4:])
