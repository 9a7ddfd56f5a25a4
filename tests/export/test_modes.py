"""ONNX export and conversion keep every module's training flag."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import costream as cs
from costream.export import export_onnx

pytest.importorskip("onnxruntime")


def _source() -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv1d(3, 4, 3, padding=1), nn.BatchNorm1d(4), nn.ReLU(),
                        nn.Conv1d(4, 2, 3))
    with torch.no_grad():  # statistics a train-mode batch norm would ignore
        net[1].running_mean.uniform_(-1, 1)
        net[1].running_var.uniform_(0.5, 2)
    return net


def _modes(net: nn.Module) -> dict[str, bool]:
    return {name: m.training for name, m in net.named_modules()}


def test_converted_containers_copy_the_source_mode() -> None:
    net = _source().eval()
    assert not any(_modes(cs.continual(net)).values())
    net.train()
    net[1].eval()  # a frozen batch norm inside a model in train mode
    co = cs.continual(net)
    assert _modes(co) == _modes(net)
    assert not net[1].training  # the source is not touched


def test_eval_convert_export_leaves_the_model_as_it_was(tmp_path) -> None:
    net = _source().eval()
    x = torch.randn(2, 3, 7)
    with torch.no_grad():
        before = net(x)
    co = cs.continual(net)
    export_onnx(co, tmp_path / "net.onnx", frame_shape=(3,))
    assert not any(_modes(net).values()) and not any(_modes(co).values())
    with torch.no_grad():
        torch.testing.assert_close(net(x), before, rtol=0, atol=0)
        # batch 1: a batch norm left in train mode raises here
        outs = [co.forward_step(x[:1, :, t]) for t in range(7)]
    assert [y is None for y in outs] == [True] * co.delay + [False] * (7 - co.delay)
    torch.testing.assert_close(torch.stack(outs[3:], 2), before[:1, :, :4], rtol=1e-5,
                               atol=1e-6)


def test_export_restores_each_submodule_flag(tmp_path) -> None:
    co = cs.continual(_source()).train()
    co[1].eval()
    expected = _modes(co)
    export_onnx(co, tmp_path / "net.onnx", frame_shape=(3,))
    assert _modes(co) == expected
