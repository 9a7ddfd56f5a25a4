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
