"""Compiled stepping: ``torch.compile`` of the pure stride step, CUDA graphs on a GPU."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..core._module import CoModule


def compile_step(module: CoModule, *, mode: str | None = None,
                 fullgraph: bool = True) -> Callable[[Any, dict], tuple[Any, dict]]:
    """``torch.compile`` :meth:`CoModule.step_stride` (one output per ``stride`` frames).

    ``mode="reduce-overhead"`` adds CUDA graph capture on a GPU. The returned function has the
    signature of ``step_stride``: ``(frames (B, C, stride, ...), state) -> (y, state)``.

    Example:
        >>> import torch, costream as cs
        >>> from costream.runtime import compile_step
        >>> net = cs.Sequential(cs.Conv1d(2, 4, 3, padding=1), torch.nn.ReLU())
        >>> step = compile_step(net)
        >>> state = net.init_state(1)
        >>> y, state = step(torch.randn(1, 2, 1), state)
        >>> y.shape
        torch.Size([1, 4])
    """
    return torch.compile(module.step_stride, mode=mode, fullgraph=fullgraph)
