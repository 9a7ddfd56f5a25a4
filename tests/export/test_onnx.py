"""ONNX export: the exported stride step equals PyTorch stepping from a fresh state."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

import costream as cs
from costream.export import OnnxStreamRunner, export_onnx

pytest.importorskip("onnxruntime")

def _torch_outputs(net: cs.CoModule, clip: torch.Tensor) -> list[torch.Tensor]:
    net.reset_state()
    with torch.no_grad():
        outs = [net.forward_step(clip[:, :, t]) for t in range(clip.shape[2])]
    net.reset_state()
    return [y for y in outs if y is not None]

def _strided_tcn(stride: int) -> cs.CoModule:
    return cs.continual(nn.Sequential(
        nn.Conv1d(3, 8, 3, padding=1), nn.ReLU(),
        nn.Conv1d(8, 8, 3, stride=stride, padding=1), nn.BatchNorm1d(8), nn.ReLU(),
        nn.MaxPool1d(2, stride=1),
        nn.Conv1d(8, 4, 3, padding=2, padding_mode="replicate"),
    )).eval()

CASES = {
    "strided conv, stride 2": (lambda: _strided_tcn(2), (3,)),
    "strided conv, stride 3": (lambda: _strided_tcn(3), (3,)),
    "residual 3d": (lambda: cs.Sequential(
        cs.Conv3d(2, 4, 3, padding=1), nn.ReLU(),
        cs.Residual(cs.Conv3d(4, 4, (3, 1, 1))),
        cs.AdaptiveAvgPool3d((1, 1, 1), window=4), cs.Reshape(-1), cs.Linear(4, 3),
    ).eval(), (2, 6, 6)),
}

@pytest.mark.parametrize("name", list(CASES))
def test_exported_step_equals_pytorch_stepping(name, tmp_path):
    torch.manual_seed(0)
    factory, frame_shape = CASES[name]
    net = factory()
    s = net.temporal.stride
    frames = 2 * net.receptive_field + 3 * s
    frames -= frames % s
    clip = torch.randn(2, *frame_shape[:1], frames, *frame_shape[1:])
    path = tmp_path / "model.onnx"
    manifest = export_onnx(net, path, frame_shape, batch_size=2)
    assert json.loads((tmp_path / "model.onnx.json").read_text()) == manifest
    assert manifest["stride"] == s and manifest["delay"] == net.delay
    expected = _torch_outputs(net, clip)
    got = OnnxStreamRunner(path).run(clip.numpy())
    assert len(got) == len(expected) > 0
    for a, b in zip(got, expected, strict=True):
        np.testing.assert_allclose(a, b.numpy(), rtol=1e-4, atol=1e-4)

def test_export_leaves_training_mode_as_it_was(tmp_path):
    net = _strided_tcn(2).train()
    export_onnx(net, tmp_path / "m.onnx", (3,))
    assert net.training
    assert all(m.training for m in net.modules())
    net.eval()
    export_onnx(net, tmp_path / "m.onnx", (3,))
    assert not any(m.training for m in net.modules())

def test_runner_reports_warm_up_per_call(tmp_path):
    net = cs.Conv1d(1, 1, 3).eval()
    export_onnx(net, tmp_path / "c.onnx", (1,))
    runner = OnnxStreamRunner(tmp_path / "c.onnx")
    ready = [bool(runner.step(np.zeros((1, 1, 1), np.float32))[1].all()) for _ in range(4)]
    assert ready == [False, False, True, True]
