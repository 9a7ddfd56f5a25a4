"""The Conv1d steady-state step's kernel choices, and parameters made under inference mode."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import costream as cs
from costream.bench import step_macs
from costream.modules import _conv
from costream.modules._onednn import ONEDNN_LINEAR
from costream.testing import assert_streaming_equivalent


def _step_all(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Step the clip frame by frame from a fresh stream; stack the outputs that became due
    (the offline outputs ``[:, :, :T - delay]``)."""
    net.reset_state()
    with torch.inference_mode():
        ys = [net.forward_step(x[:, :, t]) for t in range(x.shape[2])]
    net.reset_state()
    assert sum(y is None for y in ys) == net.delay
    return torch.stack([y for y in ys if y is not None], dim=2)


def _due(ref: torch.Tensor, net: nn.Module) -> torch.Tensor:
    return ref[:, :, :ref.shape[2] - net.delay]


@pytest.mark.skipif(ONEDNN_LINEAR is None, reason="this torch has no oneDNN linear")
def test_batched_float32_steps_take_onednn_and_equal_the_offline_conv(monkeypatch) -> None:
    calls = []

    def spy(*args):
        calls.append(args[0].shape)
        return ONEDNN_LINEAR(args[0].contiguous(), *args[1:], "none", [], "")

    monkeypatch.setattr(_conv, "onednn_linear", spy)
    torch.manual_seed(0)
    net = cs.continual(nn.Sequential(nn.Conv1d(128, 128, 3, padding=1), nn.ReLU(),
                                     nn.Conv1d(128, 96, 3, padding=1))).eval()
    x = torch.randn(96, 128, 8)  # 96 rows x 128 x 384: past the 2^22 MACs crossover
    with torch.no_grad():
        ref = net(x)
    got = _step_all(net, x)
    assert calls and all(shape == (96, 128) for shape in calls)
    torch.testing.assert_close(got, _due(ref, net), rtol=1e-4, atol=1e-5)
    # batch 1 keeps the BLAS product (oneDNN's fixed cost per call loses there)
    calls.clear()
    torch.testing.assert_close(_step_all(net, x[:1]), _due(ref[:1], net), rtol=1e-4, atol=1e-5)
    assert not calls


def test_macs_of_a_batched_onednn_step_are_counted() -> None:
    net = cs.Conv1d(128, 128, 3, padding=1).eval()
    assert step_macs(net, torch.randn(96, 128)) == 96 * 128 * 128 * 3


def test_batched_steps_see_a_weight_changed_in_place() -> None:
    torch.manual_seed(0)
    net = cs.Conv1d(128, 128, 3, padding=1).eval()
    x = torch.randn(96, 128, 8)
    _step_all(net, x)
    with torch.no_grad():
        net.weight.mul_(-0.5)
        ref = net(x)
    torch.testing.assert_close(_step_all(net, x), _due(ref, net), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("batch", [1, 96])
def test_a_model_copied_under_inference_mode_steps_correctly(batch: int) -> None:
    """Parameters created under inference mode are inference tensors without a version
    counter: stepping used to fail with torch's "Inference tensors do not track version
    counter"; it now recomputes the derived kernels and says so once."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(128, 128, 3, padding=1), nn.ReLU(),
                          nn.Conv1d(128, 64, 3, padding=1)).eval()
    x = torch.randn(batch, 128, 10)
    with torch.inference_mode():
        net = cs.continual(copy.deepcopy(model))
        assert net[0].weight.is_inference()
        ref = net(x)
    with pytest.warns(UserWarning, match="inference mode"):
        got = _step_all(net, x)
    torch.testing.assert_close(got, _due(ref, net), rtol=1e-4, atol=1e-5)
    with torch.inference_mode():  # changed in place under inference mode: still followed
        net[0].weight.mul_(2.0)
        ref = net(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.testing.assert_close(_step_all(net, x), _due(ref, net), rtol=1e-4, atol=1e-5)


def test_products_obey_cpu_autocast_like_torch() -> None:
    """Under CPU autocast the products run in its dtype, as ``F.linear`` and ``addmm`` do;
    a direct oneDNN call (float32) used to bypass it."""
    torch.manual_seed(0)
    linear = cs.Linear(1024, 1024).eval()   # 2^20 weights: the oneDNN path without autocast
    conv = cs.Conv1d(256, 256, 3, padding=1).eval()
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        ref = torch.nn.functional.linear(torch.randn(2, 1024), linear.weight, linear.bias)
        assert linear.forward_step(torch.randn(2, 1024)).dtype == ref.dtype == torch.bfloat16
        ys = [conv.forward_step(torch.randn(96, 256)) for _ in range(3)]
    assert ys[-1].dtype == torch.bfloat16


# ---------------------------------------------------------------- 3D: oneDNN's packed kernels
class _Calls(list):
    """Input shapes of oneDNN's conv calls; ``packed``: whether each got a packed kernel."""

    def __init__(self) -> None:
        super().__init__()
        self.packed: list[bool] = []


def _packed_calls(monkeypatch) -> _Calls:
    from costream.modules import _onednn
    if _onednn.ONEDNN_CONV is None:
        pytest.skip("this torch has no oneDNN convolution with packed kernels")
    calls = _Calls()
    real = _onednn.ONEDNN_CONV

    def spy(*args):
        calls.append(tuple(args[0].shape))
        calls.packed.append(args[1].is_mkldnn)
        return real(*args)

    monkeypatch.setattr(_onednn, "ONEDNN_CONV", spy)
    return calls


@pytest.fixture
def direct_steps(monkeypatch):
    """Paired convs take their direct step (the buffered conv of all kept frames)."""
    from costream.modules import _conv
    monkeypatch.setattr(_conv, "_PAIRS", [False])


def test_3d_steps_with_packed_kernels_follow_weight_changes_and_new_batches(
        monkeypatch, direct_steps) -> None:
    calls = _packed_calls(monkeypatch)
    torch.manual_seed(0)
    net = cs.continual(nn.Sequential(nn.Conv3d(3, 16, 3, padding=1), nn.ReLU(),
                                     nn.Conv3d(16, 24, (3, 3, 3), stride=(1, 2, 2),
                                               padding=(1, 1, 1)))).eval()
    x = torch.randn(1, 3, 6, 12, 12)
    with torch.no_grad():
        ref = net(x)
    torch.testing.assert_close(_step_all(net, x), _due(ref, net), rtol=1e-4, atol=1e-5)
    # each step convolves the layer's last 3 input frames at once, with the packed kernel
    assert (1, 3, 3, 12, 12) in calls and (1, 16, 3, 12, 12) in calls and all(calls.packed)
    with torch.no_grad():  # a kernel packed from the old weights must not survive this
        net[2].weight.mul_(-0.5)
        net[0].bias.add_(1.0)
        ref = net(x)
    torch.testing.assert_close(_step_all(net, x), _due(ref, net), rtol=1e-4, atol=1e-5)
    x3 = torch.randn(3, 3, 6, 10, 14)  # another batch and frame size, same packed kernels
    with torch.no_grad():
        ref3 = net(x3)
    torch.testing.assert_close(_step_all(net, x3), _due(ref3, net), rtol=1e-4, atol=1e-5)
    assert (3, 16, 3, 10, 14) in calls
    # one packed kernel per layer serves every batch and frame size (an engine's changing
    # blocks must not pile up copies of the weights)
    assert [len(net[i]._packed.packs) for i in (0, 2)] == [1, 1]


def test_a_stepped_3d_net_with_packed_kernels_copies_and_pickles() -> None:
    """Packed kernels have no storage: deep copies and pickles start without them."""
    import pickle
    torch.manual_seed(0)
    net = cs.continual(nn.Sequential(nn.Conv3d(3, 8, 3, padding=1), nn.ReLU())).eval()
    x = torch.randn(1, 3, 5, 8, 8)
    with torch.no_grad():
        ref = net(x)
    _step_all(net, x)
    for twin in (copy.deepcopy(net), pickle.loads(pickle.dumps(net))):
        torch.testing.assert_close(_step_all(twin, x), _due(ref, net), rtol=1e-4, atol=1e-5)


def test_3d_kernels_of_parameters_made_under_inference_mode_are_packed_every_step(
        monkeypatch) -> None:
    """Inference-tensor parameters tell no in-place change: their kernels are derived and
    packed at every step (a plain kernel computed other bits than the packed one for grouped
    convs, see test_fusion's copy made under inference mode)."""
    calls = _packed_calls(monkeypatch)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv3d(3, 8, 3, padding=1)).eval()
    x = torch.randn(1, 3, 5, 8, 8)
    with torch.inference_mode():
        net = cs.continual(copy.deepcopy(model))
        ref = net(x)
    with pytest.warns(UserWarning, match="inference mode"):
        got = _step_all(net, x)
    torch.testing.assert_close(got, _due(ref, net), rtol=1e-4, atol=1e-5)
    assert calls and all(calls.packed)
    assert len(net[0]._packed.packs) == 1  # one slot, its kernel replaced at every step


def test_macs_of_a_3d_step_with_packed_kernels_are_counted() -> None:
    conv = cs.Conv3d(8, 16, 3, padding=1).eval()
    frame = torch.randn(1, 8, 6, 6)
    with torch.inference_mode():
        conv.forward_step(frame)  # packs its kernel
    # all 3 taps of the new frame: 16 * 3 output channels x 36 pixels x 8 * 9 inputs each
    assert step_macs(conv, frame) == 16 * 3 * 36 * 8 * 9


def test_a_temporally_strided_3d_step_convolves_only_at_its_outputs(monkeypatch) -> None:
    calls = _packed_calls(monkeypatch)
    torch.manual_seed(0)
    net = cs.continual(nn.Sequential(nn.Conv3d(4, 8, 3, stride=(2, 1, 1), padding=1))).eval()
    x = torch.randn(2, 4, 9, 7, 7)
    with torch.no_grad():
        ref = net(x)
    for _ in range(2):  # the second pass reuses the packed kernel
        net.reset_state()
        calls.clear()
        with torch.inference_mode():
            ys = [net.forward_step(x[:, :, t]) for t in range(x.shape[2])]
        got = torch.stack([y for y in ys if y is not None], dim=2)  # every other frame
        torch.testing.assert_close(got, ref[:, :, :got.shape[2]], rtol=1e-4, atol=1e-5)
        assert got.shape[2] == 4
        assert len(calls) == 4  # the frames in between are only kept
    assert len(net[0]._packed.packs) == 1


@pytest.mark.parametrize("geometry", [
    {"kernel_size": 3, "padding": 1},
    {"kernel_size": (5, 3, 1), "padding": (2, 1, 0), "stride": (1, 2, 1)},
    {"kernel_size": (2, 3, 3), "padding": (1, 1, 1), "dilation": (3, 1, 2), "groups": 2},
    {"kernel_size": (3, 1, 1), "stride": (2, 1, 1), "bias": False},
    {"kernel_size": (3, 3, 3), "padding": (0, 2, 2), "dilation": (1, 2, 2), "stride": 2},
], ids=["k3", "k5-spatial-stride", "dilated-groups", "temporal-stride-no-bias", "strided-all"])
def test_buffered_3d_steps_in_float32_inference_equal_the_offline_conv(geometry) -> None:
    """The buffered step's oneDNN path (float32, inference mode) and its chunked path, over
    every step kind the contract checks."""
    torch.manual_seed(0)
    src = nn.Conv3d(4, 6, **geometry).eval()
    co = cs.continual(src)
    assert co._buffered
    x = torch.randn(2, 4, 11, 9, 8)
    with torch.inference_mode():
        assert_streaming_equivalent(co, x, src)
        state = co.init_state(2, (4, 9, 8))
    span = (co.kernel_size[0] - 1) * co.dilation[0]
    frames = state["tree"]["frames"]  # the last input frames
    if co._paired:  # kept one by one
        assert [f.shape for f in frames] == [(2, 4, 9, 8)] * span
    else:
        assert frames.shape == (2, 4, span, 9, 8)
