"""Call modes: which of ``forward`` / ``forward_step`` / ``forward_steps`` ``module(x)`` runs."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Literal

CallMode = Literal["forward", "forward_step", "forward_steps"]
_MODES = ("forward", "forward_step", "forward_steps")
_current: contextvars.ContextVar[str | None] = contextvars.ContextVar("costream_mode", default=None)


def current_call_mode() -> str | None:
    """The call mode set by the innermost active :func:`call_mode` context, or ``None``."""
    return _current.get()


@contextlib.contextmanager
def call_mode(mode: CallMode) -> Iterator[None]:
    """Make ``module(x)`` run ``mode`` for every continual module inside the context.

    Contexts nest: leaving an inner context restores the outer mode.

    Example:
        >>> import torch, costream as cs
        >>> conv = cs.continual(torch.nn.Conv1d(2, 3, 3))
        >>> with cs.call_mode("forward_step"):
        ...     outs = [conv(torch.randn(1, 2)) for _ in range(3)]
        >>> outs[0] is None, outs[2].shape
        (True, torch.Size([1, 3]))
    """
    if mode not in _MODES:
        raise ValueError(f"call mode must be one of {_MODES}, got {mode!r}")
    token = _current.set(mode)
    try:
        yield
    finally:
        _current.reset(token)
