"""Deployment runtime: many streams at once, stream-state checkpoints, compiled stepping."""

from ._backends import BACKENDS, make_step
from ._checkpoint import load_engine, load_stream, save_engine, save_stream
from ._compile import compile_step
from ._engine import StreamEngine

__all__ = ["BACKENDS", "StreamEngine", "compile_step", "load_engine", "load_stream",
           "make_step", "save_engine", "save_stream"]
