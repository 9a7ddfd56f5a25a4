"""Step backends (eager, compiled, onnxruntime, OpenVINO) equal eager stepping."""

from __future__ import annotations

import importlib.util
import warnings

import pytest
import torch
from torch import nn

import costream as cs
from costream.bench import Workload, run_bench
from costream.runtime import StreamEngine, compile_step, make_step

pytest.importorskip("onnxruntime")
EXPORTED = ["onnxruntime"] + (["openvino"] if importlib.util.find_spec("openvino") else [])
TOL = 1e-4  # float32 graphs, other kernels than PyTorch's


def _tcn() -> cs.CoModule:
    torch.manual_seed(0)
    return cs.continual(nn.Sequential(
        nn.Conv1d(3, 8, 3, padding=2, dilation=2), nn.ReLU(), nn.Conv1d(8, 8, 2), nn.ReLU(),
        nn.Conv1d(8, 4, 3, dilation=3))).eval()


def _transformer() -> cs.CoModule:
    torch.manual_seed(1)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
    source = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    return cs.continual(source, temporal_window=5).eval()


NETS = {"tcn": (_tcn, (3,)), "transformer": (_transformer, (8,))}


@pytest.fixture(scope="module")
def steps() -> dict:
    """Each net with its eager step and one step per exported backend (exported once)."""
    out = {}
    for name, (factory, frame_shape) in NETS.items():
        net = factory()
        out[name] = (net, frame_shape, {b: make_step(net, b, frame_shape=frame_shape)
                                        for b in EXPORTED})
    return out


def _stream(net: cs.CoModule, frame_shape: tuple[int, ...], step, batch: int = 2):
    """Step ``step`` and the eager ``step_stride`` side by side over twice the receptive
    field; assert equal outputs (once due) and ages. Returns the outputs compared."""
    gen = torch.Generator().manual_seed(2)
    state, ref = net.init_state(batch, frame_shape), net.init_state(batch, frame_shape)
    compared = 0
    with torch.inference_mode():
        for _ in range(2 * net.temporal.receptive_field):
            x = torch.randn(batch, frame_shape[0], 1, *frame_shape[1:], generator=gen)
            y, state = step(x, state)
            y_ref, ref = net.step_stride(x, ref)
            assert torch.equal(state["age"], ref["age"])
            if bool(net.ready(ref).all()):
                torch.testing.assert_close(y, y_ref, rtol=TOL, atol=TOL)
                compared += 1
    return compared


@pytest.mark.parametrize("backend", EXPORTED)
@pytest.mark.parametrize("name", list(NETS))
def test_exported_backend_equals_eager_over_twice_the_receptive_field(steps, name, backend):
    net, frame_shape, by_backend = steps[name]
    step = by_backend[backend]
    assert step.backend == backend and not step.compiled
    assert _stream(net, frame_shape, step) >= net.temporal.receptive_field


@pytest.mark.parametrize("name", list(NETS))
def test_eager_backend_takes_the_steady_path_and_equals_step_stride(steps, name):
    net, frame_shape, _ = steps[name]
    assert _stream(net, frame_shape, make_step(net, "eager")) >= net.temporal.receptive_field


def test_compile_step_falls_back_to_eager_on_cpu_and_says_why(steps):
    net, frame_shape, _ = steps["tcn"]
    with pytest.warns(RuntimeWarning, match="slower than eager") as caught:
        step = compile_step(net)
    assert step.compiled is False and "force=True" in step.reason
    with pytest.warns(RuntimeWarning, match="slower than eager") as through:
        assert make_step(net, "compiled").compiled is False
    # both warnings point at the caller's line, not inside costream
    assert [w.filename for w in (*caught, *through)] == [__file__, __file__]
    assert _stream(net, frame_shape, step) >= net.temporal.receptive_field
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # neither the make_step wrapper nor dynamo's graph
        forced = compile_step(net, backend="eager")
        assert forced.compiled is True and forced.reason is None
        assert _stream(net, frame_shape, forced) >= net.temporal.receptive_field
    torch._dynamo.reset()


def test_engine_steps_through_a_backend(steps):
    """Two streams, one opened late (a batch of 1, then of 2): the engine's outputs through
    onnxruntime equal the eager engine's (OpenVINO runs the same code with another session)."""
    backend = "onnxruntime"
    net, frame_shape, _ = steps["tcn"]
    engines = [StreamEngine(net, 2, frame_shape, backend=b) for b in ("eager", backend)]
    ids = [[e.open()] for e in engines]
    gen = torch.Generator().manual_seed(3)
    compared = 0
    with torch.inference_mode():
        for t in range(2 * net.temporal.receptive_field):
            if t == 3:
                for e, i in zip(engines, ids):
                    i.append(e.open())
            frames = {k: torch.randn(3, generator=gen) for k in range(len(ids[0]))}
            a, b = (e.step({i[k]: f for k, f in frames.items()}) for e, i in zip(engines, ids))
            for k in frames:
                ya, yb = a[ids[0][k]], b[ids[1][k]]
                assert (ya is None) == (yb is None)
                if ya is not None:
                    torch.testing.assert_close(yb, ya, rtol=TOL, atol=TOL)
                    compared += 1
    assert compared > net.temporal.receptive_field


def test_backend_errors_are_one_readable_line():
    net = _tcn()
    with pytest.raises(ValueError, match="unknown step backend 'tensorrt'"):
        make_step(net, "tensorrt")
    with pytest.raises(ValueError, match="needs the frame shape"):
        make_step(net, "onnxruntime")
    with pytest.raises(TypeError, match="continual module"):
        make_step(nn.Conv1d(2, 2, 3), "eager")
    strided = cs.continual(nn.Conv1d(3, 3, 3, stride=2)).eval()
    with pytest.raises(ValueError, match="stride 1 in the engine"):
        StreamEngine(strided, 2, (3,), backend="onnxruntime")


def test_bench_times_a_backend_and_checks_its_outputs(steps):
    net, frame_shape, _ = steps["tcn"]
    work = Workload("tcn", net, frame_shape, clip_length=net.temporal.receptive_field)
    [row] = run_bench([work], steps=5, progress=False, backend="onnxruntime")
    assert row["backend"] == "onnxruntime" and row["exact"] and row["backend_exact"]
    assert row["backend_max_abs_diff"] < TOL and row["step_ms"] > 0
    with pytest.raises(ValueError, match="unknown backend"):
        run_bench([work], progress=False, backend="tvm")


@pytest.mark.skipif("openvino" not in EXPORTED, reason="needs OpenVINO")
def test_openvino_steps_a_graph_whose_output_port_has_two_names():
    """A branch's delay line whose new state is a conv's output: OpenVINO names that output
    port after the node too (``addmm_1``), so its ``any_name`` is not the manifest's name."""
    torch.manual_seed(4)
    net = cs.BroadcastReduce(cs.Conv1d(3, 4, 3), cs.Conv1d(3, 4, 1), reduce="sum").eval()
    step = make_step(net, "openvino", frame_shape=(3,))
    assert _stream(net, (3,), step) >= net.temporal.receptive_field


@pytest.mark.parametrize("backend", ["eager", *EXPORTED])
def test_frames_that_do_not_fit_the_state_are_one_readable_line(backend):
    """Wrong frame size, channels, rank, batch or dtype: a ValueError/TypeError naming the
    expected frames, not onnxruntime's, OpenVINO's or a kernel's error."""
    net = cs.Conv2d(2, 3, 3, padding=1).eval()
    step = make_step(net, backend, frame_shape=(2, 5))
    bad = {"size": torch.randn(1, 2, 1, 6), "channels": torch.randn(1, 3, 1, 5),
           "rank": torch.randn(1, 2, 5), "batch": torch.randn(2, 2, 1, 5)}
    for x in bad.values():
        with pytest.raises(ValueError, match=r"takes frames \(B, C, stride, \*spatial\) = "
                                             r"\(1, 2, 1, 5\)"):
            step(x, net.init_state(1, (2, 5)))
    with pytest.raises((TypeError, ValueError), match="float32"):
        step(torch.randn(1, 2, 1, 5, dtype=torch.float64), net.init_state(1, (2, 5)))
    y, _ = step(torch.randn(1, 2, 1, 5), net.init_state(1, (2, 5)))
    assert y.shape == (1, 3, 5)


def test_exported_backends_refuse_a_frame_shape_or_dtype_the_module_cannot_take():
    net = _tcn()
    with pytest.raises(ValueError, match="takes 3 input channels, got frame shape"):
        make_step(net, "onnxruntime", frame_shape=(4,))
    with pytest.raises(TypeError, match=r"module's parameters are torch\.float32"):
        make_step(net, "onnxruntime", frame_shape=(3,), dtype=torch.float16)


def test_a_given_graph_for_other_frames_is_refused_by_name(tmp_path):
    from costream.export import export_onnx

    net = cs.Conv2d(2, 3, 3, padding=1).eval()
    path = tmp_path / "conv.onnx"
    export_onnx(net, path, (2, 5), batch_size=2)
    step = make_step(net, "onnxruntime", frame_shape=(2, 7), onnx=path)
    with pytest.raises(ValueError, match=r"conv.onnx steps float32 frames of shape \(2, 5\)"):
        step(torch.randn(2, 2, 1, 7), net.init_state(2, (2, 7)))
