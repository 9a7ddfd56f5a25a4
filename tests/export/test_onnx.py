"""ONNX export: the exported stride step equals PyTorch stepping from a fresh state."""

from __future__ import annotations

import json
import time
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import costream as cs
from costream.export import OnnxStreamRunner, export_onnx
from models._inputs import (
    offline_zoo_models,
    small_zoo_model,
    streamable_zoo_architectures,
    streamable_zoo_layer_sets,
    zoo_stream,
)

pytest.importorskip("onnxruntime")


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread


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

def _encoder(layers: int, **options) -> cs.CoModule:
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True, **options)
    source = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False).eval()
    return cs.continual(source, temporal_window=5).eval()


CASES = {
    "strided conv, stride 2": (lambda: _strided_tcn(2), (3,)),
    "strided conv, stride 3": (lambda: _strided_tcn(3), (3,)),
    "residual 3d": (lambda: cs.Sequential(
        cs.Conv3d(2, 4, 3, padding=1), nn.ReLU(),
        cs.Residual(cs.Conv3d(4, 4, (3, 1, 1))),
        cs.AdaptiveAvgPool3d((1, 1, 1), window=4), cs.Reshape(-1), cs.Linear(4, 3),
    ).eval(), (2, 6, 6)),
    "1-layer transformer encoder": (lambda: _encoder(1), (8,)),
    "2-layer transformer encoder": (lambda: _encoder(2, norm_first=True, activation="gelu"),
                                    (8,)),
    "3-layer transformer encoder": (lambda: _encoder(3), (8,)),
    "2-layer LSTM": (lambda: cs.continual(nn.LSTM(4, 6, num_layers=2)).eval(), (4,)),
}

@pytest.mark.parametrize("name", list(CASES))
def test_exported_step_equals_pytorch_stepping(name, tmp_path):
    torch.manual_seed(0)
    factory, frame_shape = CASES[name]
    net = factory()
    s = net.temporal.stride
    frames = max(2 * net.receptive_field + 3 * s, 16)  # 16: recurrent state over many steps
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

@pytest.mark.parametrize("optimize", [True, False])
def test_state_moved_along_a_delay_line_keeps_its_names(optimize, tmp_path):
    """A delay line's output and most of its new state are input state leaves: the graph
    still has the declared inputs and outputs (without the optimiser too)."""
    net = cs.Sequential(cs.Conv1d(2, 3, 2, stride=2), cs.Delay(3)).eval()
    clip = torch.randn(1, 2, 16)
    manifest = export_onnx(net, tmp_path / "d.onnx", (2,), optimize=optimize)
    runner = OnnxStreamRunner(tmp_path / "d.onnx")
    assert [i.name for i in runner.session.get_inputs()] == manifest["inputs"]
    assert [o.name for o in runner.session.get_outputs()] == manifest["outputs"]
    expected = _torch_outputs(net, clip)
    got = runner.run(clip.numpy())
    assert net.delay == 1 + 2 * 3  # the conv's, then 3 frames of the stride-2 rate
    assert len(got) == len(expected) == 5  # frames 7, 9, ..., 15
    for a, b in zip(got, expected, strict=True):
        np.testing.assert_allclose(a, b.numpy(), rtol=1e-5, atol=1e-6)


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


def test_export_warns_of_no_training_mode(tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        export_onnx(_strided_tcn(2), tmp_path / "m.onnx", (3,))
    assert not [w for w in caught if "training mode" in str(w.message)]


# ---------------------------------------------------------------------- the model zoo
ZOO = streamable_zoo_architectures()
#: Star skeleton models (stride 1, no temporal padding) are not exported (25 s of CPU): their
#: graph, adaptive-graph and attention layers and kernel-9 temporal convolutions are exported
#: in the strided versions, which step them on 4, 2 and 1 frames per call; unpadded
#: convolutions and delay-aligned residuals in the networks above. test_skeleton.py steps them.
LAYER_SETS = {n: v for n, v in streamable_zoo_layer_sets().items() if not n.endswith("_star")}


@pytest.mark.parametrize("name", list(LAYER_SETS), ids=["=".join(v) for v in LAYER_SETS.values()])
def test_zoo_model_exports_and_streams_in_onnxruntime(name, tmp_path):
    """Every kind of streamable zoo model (star skeleton models aside, see ``LAYER_SETS``),
    exported and run in onnxruntime from a fresh state over twice its receptive field, equals
    PyTorch stepping (float32).

    Registered names built from the same layers at the test size (test id ``a=b``) are
    exported once, on the shallowest: names with one architecture (twins), and deeper stacks
    of the same blocks (X3D-L repeats X3D-M's blocks and was the costliest export).
    ``test_zoo_models_sharing_an_architecture_compute_alike`` checks that twins are alike.
    """
    net, frame_shape = small_zoo_model(name)
    s = net.temporal.stride
    frames = 2 * net.receptive_field + (-2 * net.receptive_field) % s
    clip = zoo_stream(frame_shape, 1, frames)
    path = tmp_path / f"{name}.onnx"
    start = time.perf_counter()
    # the graph optimiser triples the export time of the deep zoo models; the optimised
    # graph is checked on the networks above
    manifest = export_onnx(net, path, frame_shape, optimize=False)
    assert time.perf_counter() - start < 120, "export took more than two minutes"
    assert manifest["frames_per_call"] == s and manifest["delay"] == net.delay
    expected = _torch_outputs(net, clip)
    got = OnnxStreamRunner(path, threads=1, spin=False).run(clip.numpy())
    assert len(got) == len(expected) == (frames - net.delay - 1) // s + 1
    for a, b in zip(got, expected, strict=True):
        np.testing.assert_allclose(a, b.numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("names", [v for v in ZOO.values() if len(v) > 1],
                         ids=["=".join(v) for v in ZOO.values() if len(v) > 1])
def test_zoo_models_sharing_an_architecture_compute_alike(names):
    """Twins exported once above: with the same weights they compute the same clip outputs."""
    first, frame_shape = small_zoo_model(names[0])
    clip = zoo_stream(frame_shape, 1, first.receptive_field + first.temporal.stride)
    with torch.no_grad():
        expected = first(clip)
        for name in names[1:]:
            twin = small_zoo_model(name)[0]
            twin.load_state_dict(first.state_dict())
            torch.testing.assert_close(twin(clip), expected, rtol=0, atol=0)


@pytest.mark.parametrize("name", offline_zoo_models())
def test_offline_zoo_model_is_refused_with_a_reason(name, tmp_path):
    """Offline-only zoo models (``streamable`` false) have no step to export."""
    net, frame_shape = small_zoo_model(name)
    with pytest.raises(ValueError, match=r"offline model \(streamable=False\)"):
        export_onnx(net, tmp_path / "m.onnx", frame_shape)
    assert not (tmp_path / "m.onnx").exists()
