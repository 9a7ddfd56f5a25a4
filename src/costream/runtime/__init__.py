"""Deployment runtime: many streams at once, stream-state checkpoints, compiled stepping."""

from ._checkpoint import load_engine, load_stream, save_engine, save_stream
from ._compile import compile_step
from ._engine import StreamEngine

__all__ = ["StreamEngine", "compile_step", "load_engine", "load_stream", "save_engine",
           "save_stream"]
