"""StreamEngine refuses frames the module would not take, as forward_step does, without casting."""

from __future__ import annotations

import pytest
import torch

import costream as cs
from costream.runtime import StreamEngine


@pytest.fixture
def engine() -> StreamEngine:
    return StreamEngine(cs.Conv1d(2, 3, 3), capacity=2, frame_shape=(2,))


@pytest.mark.parametrize("dtype", [torch.int64, torch.float16, torch.float64])
def test_frames_of_another_dtype_are_refused_before_any_step(engine, dtype) -> None:
    a, b = engine.open(), engine.open()
    good = torch.randn(2)
    with pytest.raises(TypeError, match=rf"stream {b}: frame dtype {dtype}.*torch\.float32"):
        engine.step({a: good, b: torch.ones(2, dtype=dtype)})
    assert engine.frames_seen(a) == engine.frames_seen(b) == 0  # nothing stepped
    # forward_step refuses the same frames
    with pytest.raises(TypeError, match="dtype"):
        cs.Conv1d(2, 3, 3).forward_step(torch.ones(1, 2, dtype=dtype))


def test_frames_on_another_device_are_refused(engine) -> None:
    a = engine.open()
    with pytest.raises(ValueError, match=f"stream {a}: frame on meta"):
        engine.step({a: torch.empty(2, device="meta")})


def test_non_tensor_frames_are_refused(engine) -> None:
    a = engine.open()
    with pytest.raises(TypeError, match="expected a tensor frame, got list"):
        engine.step({a: [0.0, 1.0]})


def test_a_state_dtype_other_than_the_parameters_is_refused() -> None:
    with pytest.raises(ValueError, match=r"torch\.float64 on cpu, the module's parameters "
                                         r"are torch\.float32"):
        StreamEngine(cs.Conv1d(2, 3, 3), capacity=2, frame_shape=(2,), dtype=torch.float64)
    pool = StreamEngine(cs.MaxPool1d(2), capacity=1, frame_shape=(2,), dtype=torch.float64)
    sid = pool.open()
    pool.step({sid: torch.ones(2, dtype=torch.float64)})
    with pytest.raises(TypeError, match=r"frame dtype torch\.float32"):
        pool.step({sid: torch.ones(2)})


@pytest.mark.parametrize("frame_shape, match", [
    ((3,), "Conv1d takes 2 input channels"),
    ((2, 5), r"Conv1d takes frames of 1 dimension\(s\)"),
])
def test_a_frame_shape_the_module_cannot_take_is_refused_when_built(frame_shape, match) -> None:
    """Not a kernel's error (``mat1 and mat2 shapes``, an ``IndexError``) at the first step."""
    for backend in ("eager", "onnxruntime"):
        with pytest.raises(ValueError, match=f"StreamEngine: {match}"):
            StreamEngine(cs.Conv1d(2, 3, 3), capacity=2, frame_shape=frame_shape,
                         backend=backend)


@pytest.mark.parametrize("max_batch", [1.5, True, "big", 0])
def test_a_max_batch_other_than_a_positive_int_none_or_auto_is_refused(max_batch) -> None:
    with pytest.raises(ValueError, match="max_batch must be >= 1"):
        StreamEngine(cs.Conv1d(2, 3, 3), capacity=2, frame_shape=(2,), max_batch=max_batch)
