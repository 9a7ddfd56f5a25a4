"""Step-time fusion of ``conv -> batch norm -> activation`` inside ``costream.Sequential``."""

from __future__ import annotations

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


def _fused(net: cs.Sequential) -> list:
    net._prepare()
    return [fn for _, _, fn in net._step_plan if isinstance(fn, _fusion.PointwiseConvStep)]


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
        Doubled(3, 4, 1),
    ]
    for conv in cases:
        net = cs.Sequential(conv, _bn(nn.BatchNorm3d, 4), nn.ReLU())
        assert _fused(net) == []
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
