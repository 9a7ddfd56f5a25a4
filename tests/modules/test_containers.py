"""Containers and per-frame maps: alignment, derived geometry and step-by-step values.

The registry (``test_registry.py``) runs every container through the full contract; the tests
here pin down what the outputs are, step by step, against expressions written with torch only.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import costream as cs
from costream.testing import assert_streaming_equivalent

D = torch.float64
TOL = {"rtol": 1e-10, "atol": 1e-10}


def close(actual: Tensor, expected: Tensor) -> None:
    torch.testing.assert_close(actual, expected, **TOL)


def step_all(module: cs.CoModule, x: Tensor | tuple[Tensor, ...]) -> list:
    module.reset_state()
    t = (x[0] if isinstance(x, tuple) else x).shape[2]
    frames = ((tuple(v[:, :, i] for v in x) if isinstance(x, tuple) else x[:, :, i])
              for i in range(t))
    outs = [module.forward_step(f) for f in frames]
    module.reset_state()
    return outs


def conv1d(c_in: int, c_out: int, k: int, **kw) -> tuple[cs.Conv1d, nn.Conv1d]:
    src = nn.Conv1d(c_in, c_out, k, **kw).to(D)
    return cs.continual(src), src


# ---------------------------------------------------------------------------- residuals
@pytest.mark.parametrize(("align", "offset"), [("centre", 1), ("end", 2)])
def test_residual_around_unpadded_conv(align: str, offset: int) -> None:
    co, conv = conv1d(4, 4, 3)
    res = cs.Residual(co, align=align)
    assert (res.receptive_field, res.padding, res.delay, res.stride) == (3, 0, 2, 1)
    x = torch.randn(2, 4, 11, dtype=D)
    close(res(x), conv(x) + x[:, :, offset: offset + 9])
    outs = step_all(res, x)
    assert [y is None for y in outs] == [True, True] + [False] * 9
    for t in range(2, 11):  # due at step t: the conv over frames t-2..t plus the aligned input
        expected = conv(x[:, :, t - 2: t + 1])[:, :, 0] + x[:, :, t - 2 + offset]
        close(outs[t], expected)
    assert_streaming_equivalent(res, x, lambda v: conv(v) + v[:, :, offset: offset + 9])


def test_residual_strided_with_strided_shortcut() -> None:
    co, conv = conv1d(4, 6, 3, stride=2, padding=1)
    co_s, short = conv1d(4, 6, 1, stride=2)
    res = cs.Residual(co, co_s)
    # output j reads frames 2j-1 .. 2j+1 (body) and 2j (shortcut)
    assert (res.receptive_field, res.stride, res.padding, res.delay) == (3, 2, 1, 1)
    x = torch.randn(3, 4, 12, dtype=D)
    close(res(x), conv(x) + short(x))
    outs = step_all(res, x)
    assert [t for t, y in enumerate(outs) if y is not None] == [1, 3, 5, 7, 9, 11]
    assert_streaming_equivalent(res, x, lambda v: conv(v) + short(v))


def test_residual_of_pointwise_module_has_no_delay() -> None:
    res = cs.Residual(nn.ReLU())
    assert (res.receptive_field, res.delay) == (1, 0)
    x = torch.randn(2, 3, 5, dtype=D)
    close(res(x), torch.relu(x) + x)
    close(torch.stack(step_all(res, x), 2), torch.relu(x) + x)


def test_residual_mul_reduce() -> None:
    co, conv = conv1d(3, 3, 3, padding=1)
    res = cs.Residual(co, reduce="mul")
    x = torch.randn(2, 3, 7, dtype=D)
    close(res(x), conv(x) * x)
    assert_streaming_equivalent(res, x, lambda v: conv(v) * v)


# ---------------------------------------------------------------------------- branches
def test_three_branch_concat_with_different_delays() -> None:
    (c0, t0), (c1, t1), (c2, t2) = conv1d(4, 2, 1), conv1d(4, 3, 3), conv1d(4, 2, 5, padding=1)
    assert [c.delay for c in (c0, c1, c2)] == [0, 2, 3]
    inc = cs.BroadcastReduce(c0, c1, c2, reduce="concat")
    # output j: branch 2 reads frames j-1 .. j+3, branch 1 j .. j+2, branch 0 (cropped by 1) j+1
    assert (inc.receptive_field, inc.padding, inc.delay, inc.stride) == (5, 1, 3, 1)
    x = torch.randn(3, 4, 13, dtype=D)

    def ref(v: Tensor) -> Tensor:
        return torch.cat([t0(v)[:, :, 1:-1], t1(v), t2(v)], 1)

    y = inc(x)
    assert y.shape == (3, 7, 11)
    close(y, ref(x))
    outs = step_all(inc, x)
    assert [y is None for y in outs[:4]] == [True, True, True, False]
    close(outs[3], ref(x)[:, :, 0])
    assert_streaming_equivalent(inc, x, ref)


@pytest.mark.parametrize(("op", "fn"), [("sum", torch.add), ("mul", torch.mul),
                                        ("max", torch.maximum)])
def test_broadcast_reduce_ops(op: str, fn) -> None:
    (c0, t0), (c1, t1) = conv1d(3, 4, 3, padding=1), conv1d(3, 4, 5)
    mod = cs.BroadcastReduce(c0, c1, reduce=op)
    x = torch.randn(2, 3, 12, dtype=D)
    ref = fn(t0(x)[:, :, 2:-2], t1(x))
    close(mod(x), ref)
    assert_streaming_equivalent(mod, x, ref)


def test_parallel_on_tuple_inputs() -> None:
    (c0, t0), (c1, t1) = conv1d(3, 4, 3), conv1d(2, 5, 1)
    par = cs.Parallel(c0, c1)
    assert par.delay == 2
    x = (torch.randn(2, 3, 10, dtype=D), torch.randn(2, 2, 10, dtype=D))
    a, b = par(x)
    close(a, t0(x[0]))
    close(b, t1(x[1])[:, :, 1:-1])
    outs = step_all(par, x)
    assert all(isinstance(y, tuple) and len(y) == 2 for y in outs[2:])
    close(outs[2][1], t1(x[1])[:, :, 1])
    assert_streaming_equivalent(par, x, lambda v: (t0(v[0]), t1(v[1])[:, :, 1:-1]))


def test_branches_must_share_stride() -> None:
    with pytest.raises(ValueError, match="share a temporal stride"):
        cs.BroadcastReduce(cs.Conv1d(1, 1, 3, stride=2), cs.Conv1d(1, 1, 3))
    with pytest.raises(ValueError, match="non-integer number of strided frames"):
        cs.BroadcastReduce(cs.Conv1d(1, 1, 2, stride=2), cs.Conv1d(1, 1, 1, stride=2))


def test_branch_arguments_are_validated() -> None:
    with pytest.raises(ValueError, match="align must be"):
        cs.Residual(cs.Conv1d(1, 1, 3), align="middle")
    with pytest.raises(ValueError, match="reduce must be one of"):
        cs.BroadcastReduce(cs.Conv1d(1, 1, 3), reduce="mean")
    with pytest.raises(ValueError, match="at least one branch"):
        cs.BroadcastReduce()


def test_sequential_passes_tuples_through_flush() -> None:
    """A tuple-valued frame between children (Broadcast -> Parallel -> Reduce) with end padding."""
    (c0, t0), (c1, t1) = conv1d(2, 3, 3, padding=1), conv1d(2, 3, 3, padding=1)
    net = cs.Sequential(cs.Broadcast(2), cs.Parallel(c0, c1), cs.Reduce("sum"))
    x = torch.randn(2, 2, 8, dtype=D)
    close(net(x), t0(x) + t1(x))
    close(net.forward_steps(x, pad_end=True), t0(x) + t1(x))


def test_sequential_tuple_input_flush() -> None:
    (c0, t0), (c1, t1) = conv1d(2, 3, 3, padding=1), conv1d(4, 3, 1)
    net = cs.Sequential(cs.Parallel(c0, c1), cs.Reduce("concat"))
    x = (torch.randn(2, 2, 8, dtype=D), torch.randn(2, 4, 8, dtype=D))
    ref = torch.cat([t0(x[0]), t1(x[1])], 1)
    close(net(x), ref)
    close(net.forward_steps(x, pad_end=True), ref)


# ---------------------------------------------------------------------------- sequential
def test_sequential_nesting_keeps_names_and_geometry() -> None:
    src = nn.Sequential(
        nn.Sequential(nn.Conv1d(3, 4, 3, padding=1), nn.ReLU()),
        nn.Sequential(nn.MaxPool1d(2, stride=1), nn.Sequential(nn.Conv1d(4, 4, 3, stride=2))),
    ).to(D)
    co = cs.continual(src)
    assert isinstance(co[0], cs.Sequential) and isinstance(co[1][1], cs.Sequential)
    assert isinstance(co[0][1], nn.ReLU)
    assert list(co.state_dict()) == list(src.state_dict())
    # conv k3 p1, pool k2, conv k3 s2: rf 3 + 1 + 2 = 6, padding 1, stride 2
    assert (co.receptive_field, co.padding, co.stride, co.delay) == (6, 1, 2, 4)
    x = torch.randn(2, 3, 15, dtype=D)
    assert_streaming_equivalent(co, x, src)


def test_pointwise_modules_stay_torch_modules() -> None:
    bns = [nn.BatchNorm1d(4), nn.BatchNorm2d(4), nn.BatchNorm3d(4)]
    for bn in bns:
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2.0)
    for n, bn in zip((1, 2, 3), bns, strict=True):
        conv = getattr(nn, f"Conv{n}d")(3, 4, 3, padding=1)
        src = nn.Sequential(conv, bn, nn.GELU(), nn.Dropout(0.2), nn.ReLU()).to(D).eval()
        co = cs.continual(src)
        assert [type(m) for m in co][1:] == [type(bn), nn.GELU, nn.Dropout, nn.ReLU]
        assert co[1] is bn
        x = torch.randn(2, 3, 7, *(4,) * (n - 1), dtype=D)
        assert_streaming_equivalent(co, x, src)


def test_training_mode_pointwise_modules_refuse_to_step() -> None:
    bn = cs.Sequential(cs.Conv1d(3, 3, 1), nn.BatchNorm1d(3))
    with pytest.raises(RuntimeError, match="training mode"):
        bn.forward_step(torch.randn(2, 3))
    drop = cs.Sequential(cs.Conv1d(3, 3, 1), nn.Dropout(0.5))
    with pytest.raises(RuntimeError, match="dropout in training mode"):
        drop.forward_step(torch.randn(2, 3))


# ---------------------------------------------------------------------------- time shifts
def test_delay_holds_frames_back() -> None:
    d = cs.Delay(3)
    assert (d.receptive_field, d.padding, d.delay) == (4, 0, 3)
    x = torch.randn(2, 3, 8, dtype=D)
    assert torch.equal(d(x), x)
    outs = step_all(d, x)
    assert [y is None for y in outs] == [True] * 3 + [False] * 5
    for t in range(3, 8):
        assert torch.equal(outs[t], x[:, :, t - 3])
    assert torch.equal(d.forward_steps(x, pad_end=True), x)


def test_skip_drops_first_frames() -> None:
    s = cs.Skip(2)
    assert (s.receptive_field, s.padding, s.delay) == (1, -2, 2)
    x = torch.randn(2, 3, 6, dtype=D)
    assert torch.equal(s(x), x[:, :, 2:])
    outs = step_all(s, x)
    assert outs[:2] == [None, None]
    for t in range(2, 6):
        assert torch.equal(outs[t], x[:, :, t])
    assert_streaming_equivalent(s, x, lambda v: v[:, :, 2:])


def test_delay_and_skip_reject_negative() -> None:
    with pytest.raises(ValueError, match="delay must be >= 0"):
        cs.Delay(-1)
    with pytest.raises(ValueError, match="skip must be >= 0"):
        cs.Skip(-2)


# ---------------------------------------------------------------------------- conditional
def test_conditional_follows_predicate_and_aligns_delays() -> None:
    (c0, t0), (c1, t1) = conv1d(3, 3, 5, padding=2), conv1d(3, 3, 3, padding=1)
    cond = cs.Conditional(lambda m, x: not m.training, c0, c1)
    assert (cond.delay, cond.receptive_field, cond.padding) == (2, 5, 2)
    x = torch.randn(2, 3, 9, dtype=D)
    cond.eval()
    close(cond(x), t0(x))
    assert_streaming_equivalent(cond, x, t0)
    cond.train()
    close(cond(x), t1(x))
    outs = step_all(cond, x)
    # the faster branch is held back to the slower one's delay
    assert [y is None for y in outs[:3]] == [True, True, False]
    close(outs[2], t1(x)[:, :, 0])
    assert_streaming_equivalent(cond, x, t1)


def test_conditional_branches_must_share_stride() -> None:
    with pytest.raises(ValueError, match="share a stride"):
        cs.Conditional(lambda m, x: True, cs.Conv1d(1, 1, 2, stride=2))


# ---------------------------------------------------------------------------- per-frame maps
def test_reduce_ops_on_frames() -> None:
    a, b = torch.randn(2, 3, 4, dtype=D), torch.randn(2, 3, 4, dtype=D)
    assert torch.equal(cs.Reduce("sum").forward_step((a, b)), a + b)
    assert torch.equal(cs.Reduce("mul").forward_step((a, b)), a * b)
    assert torch.equal(cs.Reduce("max").forward_step((a, b)), torch.maximum(a, b))
    assert torch.equal(cs.Reduce("concat").forward_step((a, b)), torch.cat([a, b], 1))
    with pytest.raises(ValueError, match="reduce must be one of"):
        cs.Reduce("min")


def test_linear_acts_over_channels() -> None:
    src = nn.Linear(4, 3).to(D)
    lin = cs.continual(src)
    assert isinstance(lin, cs.Linear) and lin.weight is src.weight and lin.bias is src.bias
    x = torch.randn(2, 4, 5, 3, 2, dtype=D)
    close(lin(x), src(x.movedim(1, -1)).movedim(-1, 1))
    frame = x[:, :, 0]
    close(lin.forward_step(frame), src(frame.movedim(1, -1)).movedim(-1, 1))
    lin.reset_state()
    flat = torch.randn(2, 4, dtype=D)
    close(lin.forward_step(flat), src(flat))


def test_reshape_and_lambda_act_per_frame() -> None:
    x = torch.randn(2, 3, 5, 2, 2, dtype=D)
    flat = cs.Reshape(-1)
    y = flat(x)
    assert y.shape == (2, 12, 5)
    assert torch.equal(y[:, :, 1], x[:, :, 1].reshape(2, 12))
    assert torch.equal(flat.forward_step(x[:, :, 0]), x[:, :, 0].reshape(2, 12))
    sq = cs.Lambda(torch.square)
    assert torch.equal(sq(x), x * x)
    assert torch.equal(sq.forward_step(x[:, :, 0]), x[:, :, 0] ** 2)
    for m in (flat, sq):
        assert (m.receptive_field, m.delay, m.stride) == (1, 0, 1)


@pytest.mark.parametrize("shape", [(-1,), (-1, 2)])
def test_reshape_accepts_an_empty_chunk(shape: tuple[int, ...]) -> None:
    """A chunk of zero frames mid-stream (e.g. a source with nothing new) is not an error."""
    flat = cs.Reshape(*shape)
    x = torch.randn(2, 3, 4, 2, 2, dtype=D)
    first = flat.forward_steps(x[:, :, :2])
    empty = flat.forward_steps(x[:, :, 2:2])
    assert empty is None or empty.shape[2] == 0
    rest = flat.forward_steps(x[:, :, 2:])
    assert torch.equal(torch.cat([first, rest], 2), flat(x))


# ---------------------------------------------------------------------------- adaptive pools
@pytest.mark.parametrize("kind", ["Avg", "Max"])
def test_adaptive_pool3d_on_one_window_equals_torch(kind: str) -> None:
    pool = getattr(cs, f"Adaptive{kind}Pool3d")((1, 2, 2), window=4)
    ref = getattr(nn, f"Adaptive{kind}Pool3d")((1, 2, 2))
    assert (pool.receptive_field, pool.delay) == (4, 3)
    x = torch.randn(2, 3, 4, 5, 7, dtype=D)
    expected = ref(x)
    assert expected.shape == (2, 3, 1, 2, 2)
    close(pool(x), expected)
    outs = step_all(pool, x)
    assert outs[:3] == [None, None, None]
    close(outs[3], expected[:, :, 0])
    converted = cs.continual(nn.Sequential(ref), temporal_window=4)[0]
    assert isinstance(converted, getattr(cs, f"Adaptive{kind}Pool3d"))
    close(converted(x), expected)


def test_adaptive_pool_arguments() -> None:
    with pytest.raises(ValueError, match="temporal output size must be 1"):
        cs.AdaptiveAvgPool3d((2, 1, 1), window=4)
    with pytest.raises(ValueError, match="window must be >= 1"):
        cs.AdaptiveAvgPool1d(1, window=0)
