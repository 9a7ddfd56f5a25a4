"""Deployment runtime: many streams at once, stream-state checkpoints, compiled stepping.

``BACKENDS`` names the step backends that :func:`make_step` and ``StreamEngine(backend=...)``
accept:

    >>> from costream.runtime import BACKENDS
    >>> "eager" in BACKENDS and "onnxruntime" in BACKENDS
    True
"""

from ._backends import BACKENDS, make_step
from ._checkpoint import load_engine, load_stream, save_engine, save_stream
from ._compile import compile_step
from ._engine import StreamEngine

__all__ = ["BACKENDS", "StreamEngine", "compile_step", "load_engine", "load_stream",
           "make_step", "save_engine", "save_stream"]
