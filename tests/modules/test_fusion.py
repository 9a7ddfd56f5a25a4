"""Step-time fusion of ``conv -> batch norm -> activation`` inside ``costream.Sequential``."""

from __future__ import annotations

import contextlib
import warnings

import pytest
import torch
from torch import nn

import costream as cs
from costream.bench import ptflops_step_macs
from costream.modules import _fusion, _onednn
from costream.modules._onednn import ONEDNN_LINEAR
from costream.testing import assert_streaming_equivalent


def _bn(cls: type, channels: int, affine: bool = True) -> nn.Module:
    bn = cls(channels, affine=affine)
    with torch.no_grad():  # statistics and affine parameters far from the identity
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.3, 3.0)
        if affine:
            bn.weight.uniform_(0.5, 2.0)
            bn.bias.normal_()
    return bn.eval()


def _fused(net: cs.Sequential, kind: type = _fusion.PointwiseConvStep) -> list:
    net._prepare()
    return [fn for _, _, fn in net._step_plan if isinstance(fn, kind)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("case", ["conv3d-relu", "conv3d-stride-silu", "conv2d-hardswish",
                                  "conv1d-tanh", "conv3d-bn-only", "conv3d-act-only"])
def test_fused_steps_equal_the_offline_network(case: str, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    if case == "conv3d-relu":
        layers = [nn.Conv3d(5, 7, 1, bias=False), _bn(nn.BatchNorm3d, 7), nn.ReLU()]
        x = torch.randn(2, 5, 6, 7, 5)
    elif case == "conv3d-stride-silu":
        layers = [nn.Conv3d(5, 7, 1, stride=(1, 2, 2)), _bn(nn.BatchNorm3d, 7, affine=False),
                  nn.SiLU()]
        x = torch.randn(2, 5, 6, 9, 8)
    elif case == "conv2d-hardswish":
        layers = [nn.Conv2d(4, 6, 1), _bn(nn.BatchNorm2d, 6), nn.Hardswish()]
        x = torch.randn(3, 4, 6, 11)
    elif case == "conv1d-tanh":
        layers = [nn.Conv1d(4, 6, 1), _bn(nn.BatchNorm1d, 6), nn.Tanh()]
        x = torch.randn(3, 4, 6)
    elif case == "conv3d-bn-only":
        layers = [nn.Conv3d(5, 7, 1), _bn(nn.BatchNorm3d, 7)]
        x = torch.randn(2, 5, 6, 4, 4)
    else:
        layers = [nn.Conv3d(5, 7, 1), nn.Sigmoid()]
        x = torch.randn(2, 5, 6, 4, 4)
    # a temporal conv around the triple: fusion must not disturb the layers' timing
    width = layers[0].in_channels
    ref = nn.Sequential(type(layers[0])(width, width, 3, padding=1), *layers).to(dtype).eval()
    net = cs.continual(ref)
    assert len(_fused(net)) == 1
    assert_streaming_equivalent(net, x.to(dtype), ref)


@pytest.mark.skipif(ONEDNN_LINEAR is None, reason="this torch has no oneDNN linear")
def test_large_products_take_onednn_with_the_activation_inside(monkeypatch) -> None:
    attrs = []

    def spy(x, w, b, attr, scalars, algorithm):
        attrs.append(attr)
        return ONEDNN_LINEAR(x, w, b, attr, scalars, algorithm)

    monkeypatch.setattr(_onednn, "ONEDNN_LINEAR", spy)
    ref = nn.Sequential(nn.Conv3d(24, 54, 1, bias=False), _bn(nn.BatchNorm3d, 54),
                        nn.ReLU()).eval()
    net = cs.continual(ref)
    x = torch.randn(1, 24, 3, 64, 64)
    with torch.inference_mode():
        steps = net.forward_steps(x)  # chunked: module by module
        net.reset_state()
        single = torch.stack([net.forward_step(x[:, :, t]) for t in range(3)], 2)
        expected = ref(x)
    assert attrs == ["relu"] * 3
    torch.testing.assert_close(single, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(steps, expected, rtol=1e-5, atol=1e-5)


def test_changed_statistics_and_parameters_reach_the_next_step() -> None:
    ref = nn.Sequential(nn.Conv3d(3, 4, 1), _bn(nn.BatchNorm3d, 4), nn.ReLU()).double().eval()
    net = cs.continual(ref)
    x = torch.randn(2, 3, 1, 5, 5, dtype=torch.float64)
    net.forward_step(x[:, :, 0])
    with torch.no_grad():
        net[1].running_mean.add_(0.5)  # in place
        net[1].running_var.mul_(2.0)
        net[0].weight.mul_(-1.0)
        net[1].bias = nn.Parameter(torch.randn(4, dtype=torch.float64))  # replaced
    torch.testing.assert_close(net.forward_step(x[:, :, 0]), ref(x)[:, :, 0])


def test_training_mode_batch_norm_is_not_folded() -> None:
    net = cs.continual(nn.Sequential(nn.Conv3d(3, 4, 1), nn.BatchNorm3d(4), nn.ReLU()))
    net.eval()
    net.forward_step(torch.randn(2, 3, 4, 4))
    net[1].train()
    with pytest.raises(RuntimeError, match="training mode"):
        net.forward_step(torch.randn(2, 3, 4, 4))


def test_only_plain_pointwise_convs_are_fused() -> None:
    class Doubled(cs.Conv3d):  # a subclass whose step is not the convolution
        def _step(self, x, state, age, phase):
            y, state, age, phase = super()._step(x, state, age, phase)
            return (None if y is None else 2 * y), state, age, phase

    cases = [
        cs.Conv3d(3, 4, (3, 1, 1), padding=(1, 0, 0)),  # temporal kernel
        cs.Conv3d(3, 4, (1, 3, 3), padding=(0, 1, 1)),  # spatial kernel
        cs.Conv3d(4, 4, 1, groups=2),
    ]
    for conv in cases:  # these step with the norm and activation as their epilogue
        net = cs.Sequential(conv, _bn(nn.BatchNorm3d, 4), nn.ReLU())
        assert _fused(net) == []
        assert len(_fused(net, _fusion.EpilogueConvStep)) == 1
    net = cs.Sequential(Doubled(3, 4, 1), _bn(nn.BatchNorm3d, 4), nn.ReLU())
    assert _fused(net) == _fused(net, _fusion.EpilogueConvStep) == []
    assert len(_fused(cs.Sequential(cs.Conv3d(3, 4, 1), _bn(nn.BatchNorm3d, 4)))) == 1
    assert _fused(cs.Sequential(cs.Conv3d(3, 4, 1), _bn(nn.BatchNorm3d, 5))) == []


def test_unfused_block_and_mac_counts_see_the_network_as_defined() -> None:
    ref = nn.Sequential(nn.Conv3d(3, 4, 1), _bn(nn.BatchNorm3d, 4), nn.ReLU()).eval()
    net = cs.continual(ref)
    frame = torch.randn(1, 3, 6, 6)
    with torch.inference_mode():
        fused = net.forward_step(frame)
        with _fusion.unfused():
            plain = net.forward_step(frame)
    torch.testing.assert_close(fused, plain)
    # conv 4 x 3 per pixel + bias, batch norm 2 per element, ReLU 1: 36 pixels x 4 channels
    assert ptflops_step_macs(net, frame) == 36 * 4 * (3 + 1 + 2 + 1)


@pytest.mark.parametrize("act", [nn.ReLU, nn.SiLU, nn.Sigmoid])
def test_gradients_through_fused_steps_equal_the_offline_ones(act: type) -> None:
    """With autograd on, the fold is recomputed (not cached) and the in-place activation
    keeps what its backward needs: the parameters' gradients equal the offline network's."""
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Conv3d(3, 4, 1), _bn(nn.BatchNorm3d, 4), act()).double().eval()
    net = cs.continual(ref)
    assert len(_fused(net)) == 1
    x = torch.randn(2, 3, 4, 5, 5, dtype=torch.float64)
    torch.stack([net.forward_step(x[:, :, t]) for t in range(4)], 2).square().sum().backward()
    stepped = [p.grad.clone() for p in ref.parameters()]
    ref.zero_grad()
    ref(x).square().sum().backward()
    for got, p in zip(stepped, ref.parameters(), strict=True):
        torch.testing.assert_close(got, p.grad)


# ---------------------------------------------------------------- temporal convs: epilogues
def _temporal_case(case: str) -> tuple[list[nn.Module], torch.Tensor]:
    if case == "conv3d-bn-relu":
        return [nn.Conv3d(4, 6, 3, padding=1), _bn(nn.BatchNorm3d, 6), nn.ReLU()], \
            torch.randn(2, 4, 8, 7, 6)
    if case == "conv3d-k5-stride-silu":
        return [nn.Conv3d(3, 5, (5, 3, 3), stride=(1, 2, 2), padding=(2, 1, 1)),
                _bn(nn.BatchNorm3d, 5, affine=False), nn.SiLU()], torch.randn(2, 3, 9, 9, 8)
    if case == "conv3d-dilated-groups-bn":
        return [nn.Conv3d(4, 6, (2, 3, 1), dilation=(2, 1, 1), padding=(2, 1, 0), groups=2),
                _bn(nn.BatchNorm3d, 6)], torch.randn(2, 4, 9, 5, 4)
    if case == "conv3d-temporal-stride-hardswish":
        return [nn.Conv3d(3, 4, 3, stride=(2, 1, 1), padding=1), _bn(nn.BatchNorm3d, 4),
                nn.Hardswish()], torch.randn(2, 3, 10, 5, 5)
    if case == "conv3d-replicate-sigmoid":
        return [nn.Conv3d(3, 4, 3, padding=1, padding_mode="replicate"), nn.Sigmoid()], \
            torch.randn(2, 3, 7, 5, 5)
    if case == "conv3d-spatial-only-bn-relu":
        return [nn.Conv3d(3, 4, (1, 3, 3), padding=(0, 1, 1)), _bn(nn.BatchNorm3d, 4),
                nn.ReLU()], torch.randn(2, 3, 5, 6, 6)
    if case == "conv3d-asymmetric-tpad-tanh":
        return [nn.Conv3d(3, 4, 3, padding=(0, 1, 1)), _bn(nn.BatchNorm3d, 4), nn.Tanh()], \
            torch.randn(2, 3, 7, 5, 5)
    if case == "conv2d-bn-tanh":
        return [nn.Conv2d(3, 5, 3, padding=1), _bn(nn.BatchNorm2d, 5), nn.Tanh()], \
            torch.randn(2, 3, 8, 7)
    return [nn.Conv1d(3, 5, 3, padding=2, dilation=2), _bn(nn.BatchNorm1d, 5), nn.Sigmoid()], \
        torch.randn(2, 3, 9)


_TEMPORAL_CASES = ["conv3d-bn-relu", "conv3d-k5-stride-silu", "conv3d-dilated-groups-bn",
                   "conv3d-temporal-stride-hardswish", "conv3d-replicate-sigmoid",
                   "conv3d-spatial-only-bn-relu", "conv3d-asymmetric-tpad-tanh",
                   "conv2d-bn-tanh", "conv1d-dilated-bn-sigmoid"]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("case", _TEMPORAL_CASES)
def test_temporal_convs_step_through_their_epilogue(case: str, dtype: torch.dtype) -> None:
    """The norm and activation after a conv with temporal taps run as the pass that writes
    its output; every path (steady-state, warm-up, pure step, chunks) equals the offline
    network."""
    torch.manual_seed(0)
    layers, x = _temporal_case(case)
    ref = nn.Sequential(*layers).to(dtype).eval()
    net = cs.continual(ref)
    assert len(_fused(net, _fusion.EpilogueConvStep)) == 1
    assert_streaming_equivalent(net, x.to(dtype), ref)


@pytest.mark.parametrize("case", ["conv3d-bn-relu", "conv3d-k5-stride-silu", "conv2d-bn-tanh"])
def test_epilogue_steps_leave_the_partial_sums_of_the_network_as_defined(case: str) -> None:
    """Single steps (fused) then a chunk with the end padding (module by module) continue
    one stream: the state between them is the unfused network's."""
    torch.manual_seed(1)
    layers, x = _temporal_case(case)
    ref = nn.Sequential(*layers).eval()
    net = cs.continual(ref)
    with torch.inference_mode():
        expected = ref(x)
        head = [net.forward_step(x[:, :, t]) for t in range(5)]
        tail = net.forward_steps(x[:, :, 5:], pad_end=True)
        trees = []
        for fuse in (True, False):
            net.reset_state()
            with contextlib.nullcontext() if fuse else _fusion.unfused():
                for t in range(5):
                    net.forward_step(x[:, :, t])
            trees.append(net.get_state()["tree"])
    got = torch.cat([torch.stack([y for y in head if y is not None], 2), tail], 2)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(trees[0], trees[1], rtol=0, atol=0)


@pytest.mark.skipif(_onednn.ONEDNN_CONV is None, reason="this torch has no packed oneDNN conv")
@pytest.mark.parametrize("kernel", [(3, 3, 3), (1, 3, 3), (5, 1, 3)])
def test_3d_steps_run_the_norm_and_activation_inside_the_packed_conv(monkeypatch,
                                                                    kernel) -> None:
    """Float32 inference steps of a 3D conv end in one packed oneDNN call: a conv with
    temporal taps convolves its buffered frames with the norm folded into its kernel and the
    activation as the call's post-op; a stateless (1 x kh x kw) one convolves the frame. Both
    equal the offline network."""
    attrs = []
    real = _onednn.ONEDNN_CONV

    def spy(*args):
        attrs.append((args[0].dim(), args[7]))
        return real(*args)

    monkeypatch.setattr(_onednn, "ONEDNN_CONV", spy)
    torch.manual_seed(2)
    pad = tuple(k // 2 for k in kernel)
    for tail in ([], [_bn(nn.BatchNorm3d, 6), nn.ReLU()]):
        ref = nn.Sequential(nn.Conv3d(4, 6, kernel, stride=(1, 2, 1), padding=pad),
                            *tail).eval()
        net = cs.continual(ref)
        x = torch.randn(2, 4, 9, 9, 6)
        attrs.clear()
        with torch.inference_mode():
            got = net.forward_steps(x, pad_end=True)  # chunks: module by module
            net.reset_state()
            attrs.clear()
            steps = [net.forward_step(x[:, :, t]) for t in range(9)]
            expected = ref(x)
        steps = torch.stack([y for y in steps if y is not None], 2)
        torch.testing.assert_close(steps, expected[:, :, :steps.shape[2]], rtol=1e-4,
                                   atol=1e-5)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
        dims = 4 if kernel[0] == 1 else 5
        if kernel[0] == 1:  # the stateless lean path: steady-state steps only, epilogue after
            assert {a for a in attrs} == {(4, "none")}
        else:  # every step of the buffered conv, the activation inside the call when fused
            assert {a for a in attrs} == {(dims, "relu" if tail else "none")}


@pytest.mark.parametrize("fused", ["pointwise", "epilogue"])
def test_a_changed_batch_norm_eps_reaches_the_next_step(fused: str) -> None:
    """``eps`` is a float no version counter tracks: the folded norm is derived again."""
    k = 1 if fused == "pointwise" else 3
    ref = nn.Sequential(nn.Conv3d(3, 4, k, padding=k // 2), _bn(nn.BatchNorm3d, 4),
                        nn.ReLU()).double().eval()
    net = cs.continual(ref)
    x = torch.randn(2, 3, 6, 5, 5, dtype=torch.float64)
    with torch.no_grad():  # the folded norm is cached (with autograd on it is derived anew)
        steps = [net.forward_step(x[:, :, t]) for t in range(3)]
        ref[1].eps = 0.5  # mid-stream
        assert net[1].eps == 0.5
        steps += [net.forward_step(x[:, :, t]) for t in range(3, 6)]
        expected = ref(x)
    got = torch.stack([y for y in steps if y is not None], 2)
    delay = k // 2
    torch.testing.assert_close(got[:, :, 3 - delay:], expected[:, :, 3 - delay:6 - delay])


def test_epilogue_under_cpu_autocast_equals_the_unfused_step() -> None:
    """Under CPU autocast the conv's output is bfloat16 and the norm float32: the epilogue
    runs the modules' own steps, as the unfused network does."""
    torch.manual_seed(3)
    net = cs.continual(nn.Sequential(nn.Conv3d(3, 4, 3, padding=1), _bn(nn.BatchNorm3d, 4),
                                     nn.ReLU()).eval())
    x = torch.randn(2, 3, 5, 6, 6)
    outs = []
    for fuse in (True, False):
        net.reset_state()
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            if fuse:
                outs.append([net.forward_step(x[:, :, t]) for t in range(5)])
            else:
                with _fusion.unfused():
                    outs.append([net.forward_step(x[:, :, t]) for t in range(5)])
    for a, b in zip(*outs, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            assert a.dtype == b.dtype
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("conv", ["3x3x3", "grouped-5-taps"])
def test_a_copy_made_under_inference_mode_resumes_a_fused_stream_bit_identically(conv) -> None:
    """Under inference mode the contract's fresh copy has inference-tensor parameters, whose
    kernels are derived at every step: they must run the same oneDNN op on the same packed
    kernel layout (the SiLU post-op included) to resume the saved stream bit for bit (a
    grouped conv handed the plain kernel computed other bits)."""
    torch.manual_seed(4)
    c, layer = (4, nn.Conv3d(3, 4, 3, padding="same")) if conv == "3x3x3" else (
        24, nn.Conv3d(24, 24, (5, 3, 3), padding=(2, 1, 1), groups=2))
    ref = nn.Sequential(layer, _bn(nn.BatchNorm3d, c), nn.SiLU()).eval()
    net = cs.continual(ref)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # (where the plain and the packed kernel's bits differed)
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the copy's kernels are derived at every step
        try:
            assert_streaming_equivalent(net, torch.randn(1, layer.in_channels, 9, 6, 5), ref)
        finally:
            torch.set_num_threads(threads)
