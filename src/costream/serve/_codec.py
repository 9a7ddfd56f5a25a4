"""Frames in and outputs out: ``.npy`` or raw bytes with a dtype and shape, checked before a
frame reaches a stream (a bad frame is refused with one readable line; the stream is intact)."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import torch
from torch import Tensor

NPY_MAGIC = b"\x93NUMPY"


class FrameError(ValueError):
    """A frame that cannot enter a stream; ``status`` is the HTTP code that answers it."""

    def __init__(self, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.status = status


def decode_frame(body: bytes, *, dtype: str | None = None, shape: str | None = None) -> np.ndarray:
    """An array from an ``.npy`` body, or from raw bytes with ``dtype`` and ``shape``
    (``"3,224,224"``).

    Example:
        >>> import numpy as np
        >>> from costream.serve._codec import decode_frame
        >>> decode_frame(np.arange(3.0).tobytes(), dtype="float64", shape="3")
        array([0., 1., 2.])
        >>> decode_frame(b"xyz")
        Traceback (most recent call last):
        ...
        costream.serve._codec.FrameError: a raw frame body needs the dtype and shape ...
    """
    if body.startswith(NPY_MAGIC):
        try:
            return np.load(io.BytesIO(body), allow_pickle=False)
        except Exception as err:  # every reading failure means a malformed body
            raise FrameError(f"malformed .npy body: {err}", 400) from err
    if dtype is None or shape is None:
        raise FrameError("a raw frame body needs the dtype and shape parameters (or send an "
                         ".npy body)", 400)
    try:
        dt = np.dtype(dtype)
        dims = tuple(int(d) for d in shape.split(",") if d.strip())
    except (TypeError, ValueError) as err:
        raise FrameError(f"bad dtype or shape parameter ({dtype!r}, {shape!r}): {err}",
                         400) from err
    expected = int(np.prod(dims, dtype=np.int64)) * dt.itemsize
    if len(body) != expected:
        raise FrameError(f"raw body has {len(body)} bytes; dtype {dt} and shape {dims} need "
                         f"{expected}", 400)
    return np.frombuffer(body, dtype=dt).reshape(dims)


def check_frame(frame: Any, frame_shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """``frame`` (array or tensor) as a tensor of the serving ``dtype``, after checking that it
    is a float frame of ``frame_shape``.

    Example:
        >>> import torch
        >>> from costream.serve._codec import check_frame
        >>> check_frame(torch.zeros(2, 3), (3,), torch.float32)
        Traceback (most recent call last):
        ...
        costream.serve._codec.FrameError: frame shape (2, 3), expected (3,)
    """
    if isinstance(frame, np.ndarray):
        if frame.dtype.kind != "f":
            raise FrameError(f"frame dtype {frame.dtype} is not a float type")
        frame = torch.from_numpy(np.array(frame, copy=True))
    if not isinstance(frame, Tensor):
        raise FrameError(f"a frame is a tensor or an array, not {type(frame).__name__}", 400)
    if not frame.is_floating_point():
        raise FrameError(f"frame dtype {frame.dtype} is not a float type")
    if tuple(frame.shape) != tuple(frame_shape):
        raise FrameError(f"frame shape {tuple(frame.shape)}, expected {tuple(frame_shape)}")
    if not bool(torch.isfinite(frame).all()):
        raise FrameError("frame has NaN or infinite values")
    return frame.detach().to("cpu", dtype).contiguous()


def encode_output(y: Tensor | None) -> dict[str, Any]:
    """A JSON-ready output: ``{"output": nested list or None, "shape", "dtype"}`` (float64
    values print exactly: JSON numbers round-trip through Python's ``repr``)."""
    if y is None:
        return {"output": None}
    return {"output": y.tolist(), "shape": list(y.shape), "dtype": str(y.dtype)[6:]}
