"""The CoModule contract: call modes, input errors, explicit state, streams and geometry."""

from __future__ import annotations

import copy
import io
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

import costream as cs
from costream.core import Temporal, current_call_mode, tree_leaves

D = torch.float64


def step_all(module: cs.CoModule, x: Tensor) -> list[Tensor | None]:
    """Fresh stream: ``forward_step`` over every frame of ``x``, then reset."""
    module.reset_state()
    outs = [module.forward_step(x[:, :, t]) for t in range(x.shape[2])]
    module.reset_state()
    return outs


def save_load(state: dict) -> dict:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _stride1_net() -> cs.Sequential:
    return cs.Sequential(
        cs.Conv1d(3, 4, 3, padding=1), nn.ReLU(),
        cs.MaxPool1d(3, stride=1, padding=1),
        cs.Residual(cs.Conv1d(4, 4, 3)),
        cs.BroadcastReduce(cs.Conv1d(4, 2, 1),
                           cs.Conv1d(4, 2, 3, padding=1, padding_mode="replicate"),
                           reduce="concat"),
        cs.AvgPool1d(2, stride=1),
    ).to(D)


def _strided_net() -> cs.Sequential:
    return cs.Sequential(
        cs.Conv1d(3, 4, 3, stride=2, padding=1), nn.ReLU(),
        cs.Residual(cs.Conv1d(4, 4, 3, padding=1)),
        cs.AvgPool1d(2, stride=2),
        cs.Conv1d(4, 2, 2),
    ).to(D)


def _conv2d_net() -> cs.Sequential:
    return cs.Sequential(cs.Conv2d(3, 4, (3, 3), padding=(2, 1), padding_mode="replicate"),
                         nn.GELU(), cs.MaxPool2d((2, 2), stride=(1, 2)),
                         cs.Conv2d(4, 2, (3, 1))).to(D)


NETS: dict[str, tuple[Callable[[], cs.CoModule], tuple[int, ...]]] = {
    "stride1": (_stride1_net, (3,)),
    "strided": (_strided_net, (3,)),
    "conv2d": (_conv2d_net, (3, 6)),
}


# ---------------------------------------------------------------------------- call modes
def test_call_mode_selects_the_method() -> None:
    conv = cs.Conv1d(2, 3, 3).to(D)
    x = torch.randn(1, 2, 6, dtype=D)
    expected = conv(x)
    assert current_call_mode() is None
    with cs.call_mode("forward_step"):
        outs = [conv(x[:, :, t]) for t in range(6)]
    assert outs[:2] == [None, None]
    torch.testing.assert_close(torch.stack(outs[2:], 2), expected, rtol=1e-10, atol=1e-10)
    conv.reset_state()
    with cs.call_mode("forward_steps"):
        torch.testing.assert_close(conv(x), expected, rtol=1e-10, atol=1e-10)
    conv.reset_state()
    with cs.call_mode("forward"):
        assert conv(x).shape == expected.shape
    assert current_call_mode() is None


def test_call_mode_nesting_restores_outer_mode() -> None:
    conv = cs.Conv1d(2, 3, 1).to(D)
    frame, clip = torch.randn(1, 2, dtype=D), torch.randn(1, 2, 4, dtype=D)
    with cs.call_mode("forward_step"):
        assert conv(frame).shape == (1, 3)
        with cs.call_mode("forward"):
            assert current_call_mode() == "forward"
            assert conv(clip).shape == (1, 3, 4)
            with cs.call_mode("forward_steps"):
                assert current_call_mode() == "forward_steps"
            assert current_call_mode() == "forward"
        assert current_call_mode() == "forward_step"
        assert conv(frame).shape == (1, 3)
    assert current_call_mode() is None
    assert conv(clip).shape == (1, 3, 4)


def test_call_mode_restored_after_exception() -> None:
    with pytest.raises(RuntimeError, match="boom"), cs.call_mode("forward_step"):
        raise RuntimeError("boom")
    assert current_call_mode() is None


def test_call_mode_default_attribute() -> None:
    conv = cs.Conv1d(2, 3, 1).to(D)
    conv.call_mode = "forward_step"
    assert conv(torch.randn(1, 2, dtype=D)).shape == (1, 3)
    with cs.call_mode("forward"):  # a context overrides the module default
        assert conv(torch.randn(1, 2, 4, dtype=D)).shape == (1, 3, 4)


def test_call_mode_rejects_unknown_mode() -> None:
    with pytest.raises(ValueError, match="call mode must be one of"), cs.call_mode("step"):
        pass


# ---------------------------------------------------------------------------- input errors
def test_clip_passed_to_forward_step() -> None:
    conv = cs.Conv1d(4, 6, 3).to(D)
    with pytest.raises(ValueError, match=r"expects one frame of shape \(B, C\) \(2 dims\)"):
        conv.forward_step(torch.randn(2, 4, 5, dtype=D))
    conv3 = cs.Conv3d(4, 6, 3).to(D)
    with pytest.raises(ValueError, match=r"clips .* go to forward or forward_steps"):
        conv3.forward_step(torch.randn(2, 4, 5, 6, 6, dtype=D))


def test_frame_passed_to_forward() -> None:
    conv = cs.Conv2d(4, 6, 3).to(D)
    with pytest.raises(ValueError, match="expects a clip with 4 dims"):
        conv(torch.randn(2, 4, 5, dtype=D))
    with pytest.raises(ValueError, match="forward_steps expects a clip"):
        conv.forward_steps(torch.randn(2, 4, dtype=D))


def test_channel_mismatch() -> None:
    conv = cs.Conv1d(4, 6, 3).to(D)
    with pytest.raises(ValueError, match="expects 4 input channels"):
        conv.forward_step(torch.randn(2, 3, dtype=D))
    net = cs.Sequential(nn.ReLU(), cs.Conv2d(4, 6, 3))
    with pytest.raises(ValueError, match="expects 4 input channels"):
        net.forward_step(torch.randn(2, 5, 7))


def test_channel_change_mid_stream() -> None:
    conv = cs.Conv1d(4, 6, 3).to(D)
    conv.forward_step(torch.randn(2, 4, dtype=D))
    with pytest.raises(ValueError, match="differs from the stream's"):
        conv.forward_step(torch.randn(2, 5, dtype=D))


def test_batch_size_change_mid_stream() -> None:
    conv = cs.Conv1d(4, 6, 3, padding=1).to(D)
    x = torch.randn(2, 4, 6, dtype=D)
    conv.forward_step(x[:, :, 0])
    with pytest.raises(ValueError, match="batch size changed from 2 to 3 mid-stream"):
        conv.forward_step(torch.randn(3, 4, dtype=D))
    with pytest.raises(ValueError, match="batch size changed"):
        conv.forward_steps(torch.randn(1, 4, 3, dtype=D))
    # the rejected frames left the stream alone
    rest = [conv.forward_step(x[:, :, t]) for t in range(1, 6)]
    expected = step_all(conv, x)[1:]
    for a, b in zip(rest, expected, strict=True):
        assert torch.equal(a, b)
    conv.reset_state()  # after a reset any batch size is fine
    assert conv.forward_step(torch.randn(3, 4, dtype=D)) is None


@pytest.mark.parametrize("where", ["start", "mid_stream"])
def test_wrong_dtype(where: str) -> None:
    conv = cs.Conv1d(4, 6, 3, padding=1).to(D)
    if where == "mid_stream":
        conv.forward_step(torch.randn(2, 4, dtype=D))
    with pytest.raises(TypeError, match="float32"):
        conv.forward_step(torch.randn(2, 4, dtype=torch.float32))


def test_reset_mask_of_wrong_shape_or_dtype() -> None:
    conv = cs.Conv1d(4, 6, 3, padding=1).to(D)
    conv.forward_step(torch.randn(2, 4, dtype=D))
    with pytest.raises(ValueError, match=r"reset mask must be a bool tensor of shape \(2,\)"):
        conv.reset_state(torch.tensor([True, False, True]))
    with pytest.raises(ValueError, match="reset mask must be a bool tensor"):
        conv.reset_state(torch.tensor([1, 0]))
    with pytest.raises(ValueError, match="reset mask must be a bool tensor"):
        conv.reset_state(torch.tensor([[True, False]]))


def test_reset_mask_on_strided_network_at_nonzero_phase() -> None:
    net = _strided_net()
    assert net.stride == 4
    x = torch.randn(3, 3, 12, dtype=D)
    for t in range(5):  # phase 1
        net.forward_step(x[:, :, t])
    before = net.get_state()
    with pytest.raises(ValueError, match=r"temporal stride 4.*phase 0.*current phase 1"):
        net.reset_state(torch.tensor([True, False, False]))
    after = net.get_state()  # nothing was reset
    assert torch.equal(before["age"], after["age"])
    for t in range(5, 8):
        net.forward_step(x[:, :, t])
    net.reset_state(torch.tensor([True, False, False]))  # phase 0: allowed
    assert net.get_state()["age"].tolist() == [0, 8, 8]


def test_ready_needs_a_stream() -> None:
    with pytest.raises(RuntimeError, match="no stream is running"):
        cs.Conv1d(1, 1, 3).ready()


def test_init_state_needs_frame_shape_with_spatial_dims() -> None:
    with pytest.raises(ValueError, match="needs frame_shape"):
        cs.Conv2d(1, 1, 3).init_state(2)
    state = cs.Conv1d(3, 2, 3).init_state(2)
    assert state["frame_shape"] == (3,)


# ---------------------------------------------------------------------------- set_state errors
def test_set_state_mismatch_applies_nothing() -> None:
    net = _stride1_net()
    x = torch.randn(2, 3, 14, dtype=D)
    expected = step_all(net, x)
    for t in range(6):
        net.forward_step(x[:, :, t])
    good = net.get_state()
    other = cs.Sequential(cs.Conv1d(3, 5, 3, padding=1)).to(D).init_state(2, (3,))
    wrong_batch = {**good, "age": torch.zeros(3, dtype=torch.long)}  # tree holds 2 streams
    bad_leaf = copy.deepcopy(good)
    bad_leaf["tree"][0]["psum"] = bad_leaf["tree"][0]["psum"][..., :2]
    attempts = [
        (other, "does not match this module"),
        (wrong_batch, "expected shape"),
        (bad_leaf, "leaf '0.psum'"),
        ({"tree": good["tree"]}, "keys 'tree', 'age' and 'phase'"),
        ({**good, "age": good["age"].float()}, "int64 tensor"),
        ({**good, "phase": 3}, r"phase.*must be in \[0, 1\)"),
        ([good], "a stream state is a dict"),
    ]
    for state, words in attempts:
        with pytest.raises(ValueError, match=words):
            net.set_state(state)
    # the module keeps stepping its old stream correctly
    for t in range(6, 14):
        y = net.forward_step(x[:, :, t])
        assert torch.equal(y, expected[t])
    assert net.get_state()["age"].tolist() == [14, 14]


def test_set_state_rejects_dtype_other_than_parameters() -> None:
    conv = cs.Conv1d(3, 4, 3, padding=1).to(D)
    x = torch.randn(2, 3, 8, dtype=D)
    expected = step_all(conv, x)
    for t in range(4):
        conv.forward_step(x[:, :, t])
    state32 = cs.Conv1d(3, 4, 3, padding=1).init_state(2, (3,))  # float32 state
    with pytest.raises((TypeError, ValueError), match="float32"):
        conv.set_state(state32)
    for t in range(4, 8):
        assert torch.equal(conv.forward_step(x[:, :, t]), expected[t])


# ---------------------------------------------------------------------------- explicit state
@pytest.mark.parametrize("make", [lambda: cs.Skip(1), lambda: cs.Lambda(torch.tanh),
                                  lambda: cs.Sequential(nn.ReLU(), cs.Reshape(-1))],
                         ids=["skip", "lambda", "sequential_pointwise"])
def test_resume_stateless_module_in_float64(make) -> None:
    """Modules without parameters or floating state resume a float64 stream."""
    module = make()
    x = torch.randn(2, 3, 6, dtype=D)
    full = step_all(module, x)
    for t in range(3):
        module.forward_step(x[:, :, t])
    state = save_load(module.get_state())
    fresh = make()
    fresh.set_state(state)
    for t in range(3, 6):
        assert torch.equal(fresh.forward_step(x[:, :, t]), full[t])


@pytest.mark.parametrize("name", sorted(NETS))
def test_save_and_resume_is_bit_identical(name: str) -> None:
    make, frame = NETS[name]
    net = make()
    x = torch.randn(3, *frame[:1], 21, *frame[1:], dtype=D)
    full = step_all(net, x)
    for cut in (5, 8, 13):
        net.reset_state()
        for t in range(cut):
            net.forward_step(x[:, :, t])
        state = save_load(net.get_state())
        net.reset_state()
        resumed_copy = copy.deepcopy(net)
        resumed_new = make()
        resumed_new.load_state_dict(net.state_dict())
        for m in (resumed_copy, resumed_new):
            m.set_state(state)
            for t in range(cut, 21):
                y = m.forward_step(x[:, :, t])
                if full[t] is None:
                    assert y is None
                else:
                    assert torch.equal(y, full[t]), f"{name}: cut {cut}, step {t}"


def test_get_state_is_a_detached_copy() -> None:
    conv = cs.Conv1d(2, 3, 3, padding=1).to(D)
    assert conv.get_state() is None
    x = torch.randn(2, 2, 6, dtype=D)
    conv.forward_step(x[:, :, 0])
    state = conv.get_state()
    snapshot = copy.deepcopy(state)
    conv.forward_step(x[:, :, 1])
    assert torch.equal(state["tree"]["psum"], snapshot["tree"]["psum"])
    assert not torch.equal(conv.get_state()["tree"]["psum"], snapshot["tree"]["psum"])
    assert state["age"].tolist() == [1, 1]


@torch.no_grad()  # a module holding a stream is deep-copied below
def test_resume_state_with_streams_at_different_ages() -> None:
    net = _stride1_net()
    x = torch.randn(3, 3, 16, dtype=D)
    for t in range(7):
        net.forward_step(x[:, :, t])
        if t == 3:
            net.reset_state(torch.tensor([False, True, False]))
    state = save_load(net.get_state())
    assert state["age"].tolist() == [7, 3, 7]
    reference = copy.deepcopy(net)
    fresh = copy.deepcopy(net)
    fresh.reset_state()
    fresh.set_state(state)
    for t in range(7, 16):
        a, b = reference.forward_step(x[:, :, t]), fresh.forward_step(x[:, :, t])
        assert torch.equal(reference.ready(), fresh.ready())
        # bit-identical, including the unspecified rows of the stream that is not ready yet
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def test_pure_step_does_not_touch_module_state() -> None:
    net = _stride1_net()
    x = torch.randn(2, 3, 10, dtype=D)
    expected = step_all(net, x)
    state = net.init_state(2, (3,))
    first, initial = state, copy.deepcopy(state)
    for t in range(10):
        y, state = net.step(x[:, :, t], state)
        if net.ready(state).all():
            assert torch.equal(y, expected[t])
    assert net._stream is None
    assert torch.equal(first["age"], torch.zeros(2, dtype=torch.long))
    assert state["age"].tolist() == [10, 10]
    # the initial state was not modified in place
    leaves, expected_leaves = tree_leaves(first["tree"]), tree_leaves(initial["tree"])
    for (path, a), (_, b) in zip(leaves, expected_leaves, strict=True):
        assert torch.equal(a, b), path


@pytest.mark.parametrize("name", sorted(NETS))
def test_streams_reset_at_different_steps_match_solo_runs(name: str) -> None:
    """Four streams, restarted at different steps; each matches its own run alone."""
    make, frame = NETS[name]
    net = make()
    s = net.stride
    steps = 14 * s
    resets = {2 * s: [1], 3 * s: [2, 3], 5 * s: [1], 7 * s: [0]}
    b = 4
    clips = torch.randn(b, frame[0], steps, *frame[1:], dtype=D)
    start = [0] * b
    mixed = []
    for t in range(steps):
        if t in resets:
            mask = torch.zeros(b, dtype=torch.bool)
            mask[resets[t]] = True
            net.reset_state(mask)
            for i in resets[t]:
                start[i] = t
        frames = torch.stack([clips[i, :, t - start[i]] for i in range(b)])
        y = net.forward_step(frames)
        mixed.append((y, None if y is None else net.ready().clone(), list(start)))
    net.reset_state()
    compared = 0
    solo_cache: dict[tuple[int, int], list] = {}
    for t, (y, ready, starts) in enumerate(mixed):
        for i in range(b):
            key = (i, starts[i])
            if key not in solo_cache:
                seg_end = min([u for u in resets if u > starts[i] and i in resets[u]] + [steps])
                solo_cache[key] = step_all(net, clips[i: i + 1, :, : seg_end - starts[i]])
            solo = solo_cache[key][t - starts[i]]
            if y is None or not bool(ready[i]):
                assert solo is None, f"stream {i}: no due output at step {t}, solo run had one"
                continue
            assert solo is not None, f"stream {i} ready at step {t} but its solo run had no output"
            torch.testing.assert_close(y[i: i + 1], solo, rtol=1e-10, atol=1e-10)
            compared += 1
    assert compared >= steps // s


# ---------------------------------------------------------------------------- geometry
def test_sequential_geometry_of_two_convs() -> None:
    net = cs.Sequential(cs.Conv1d(1, 1, 3), cs.Conv1d(1, 1, 3))
    assert (net.receptive_field, net.stride, net.padding, net.delay) == (5, 1, 0, 4)
    padded = cs.Sequential(cs.Conv1d(1, 1, 3, padding=1), nn.ReLU(), cs.Conv1d(1, 1, 3, padding=1))
    assert (padded.receptive_field, padded.padding, padded.delay) == (5, 2, 2)


def test_sequential_geometry_with_strided_first_conv() -> None:
    net = cs.Sequential(cs.Conv1d(1, 1, 3, stride=2), cs.Conv1d(1, 1, 3))
    # the second conv's 3 taps are 2 input frames apart: 3 + (3 - 1) * 2
    assert (net.receptive_field, net.stride) == (7, 2)
    assert (net.padding, net.delay) == (0, 6)
    padded = cs.Sequential(cs.Conv1d(1, 1, 3, stride=2, padding=1), cs.Conv1d(1, 1, 3, padding=1))
    assert (padded.receptive_field, padded.stride, padded.padding, padded.delay) == (7, 2, 3, 3)
    x = torch.randn(1, 1, 15)
    outs = step_all(padded, x)
    assert [t for t, y in enumerate(outs) if y is not None] == [3, 5, 7, 9, 11, 13]


def test_geometry_of_dilated_and_pooled_chain() -> None:
    net = cs.Sequential(cs.Conv1d(1, 1, 3, dilation=2), cs.MaxPool1d(2), cs.Conv1d(1, 1, 2),
                        cs.AvgPool1d(3, stride=1, padding=1))
    # conv: 5 frames; pool k2 s2: +1 (stride now 2); conv k2: +1 * 2; pool k3: +2 * 2
    assert net.receptive_field == 5 + 1 + 2 + 4
    assert net.stride == 2
    assert net.padding == 1 * 2  # the last pool's one frame of padding is two input frames
    assert net.delay == 12 - 1 - 2
    x = torch.randn(2, 1, 30)
    outs = step_all(net, x)
    assert [t for t, y in enumerate(outs) if y is not None] == list(range(9, 30, 2))


def test_temporal_composition_rules() -> None:
    a = Temporal(receptive_field=3, stride=2, padding=1, end_padding=1)
    b = Temporal(receptive_field=4, stride=3, padding=2, end_padding=0)
    c = a.then(b)
    assert c.receptive_field == 3 + 3 * 2
    assert c.stride == 6
    assert c.padding == 1 + 2 * 2
    assert c.delay == c.receptive_field - 1 - c.padding
    for t in range(1, 40):  # offline lengths compose
        assert c.out_length(t) == b.out_length(a.out_length(t))


@pytest.mark.parametrize("name", sorted(NETS))
def test_delay_is_first_output_step(name: str) -> None:
    make, frame = NETS[name]
    net = make()
    t_in = 6 * net.receptive_field
    x = torch.randn(1, frame[0], t_in, *frame[1:], dtype=D)
    outs = step_all(net, x)
    due = [t for t, y in enumerate(outs) if y is not None]
    assert due == list(range(net.delay, t_in, net.stride))
    offline = net(x)
    assert offline.shape[2] == net.temporal.out_length(t_in)
    stepped = torch.stack([outs[t] for t in due], 2)
    torch.testing.assert_close(stepped, offline[:, :, : len(due)], rtol=1e-10, atol=1e-10)
