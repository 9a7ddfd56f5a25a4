"""Compiled stepping: ``torch.compile`` of the pure stride step, CUDA graphs on a GPU."""

from __future__ import annotations

import os
import sys
import types
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ..core._module import CoModule
from ..core._tree import tree_map


def _stride_step(module: CoModule) -> Callable[[Any, dict], tuple[Any, dict]]:
    """``module.step_stride`` returning state leaves in the layout of fresh ones.

    Some layers return state tensors that are views (e.g. partial sums sliced out of
    channels-last tap contributions) with other strides than :meth:`CoModule.init_state` gives.
    ``torch.compile`` guards on input strides (size-1 dimensions included), so the second call
    would recompile the whole step. Leaves written in the row-major layout of
    ``torch.zeros`` keep every call on the first graph; inside the graph the copy fuses with
    the computation that writes the leaf. :class:`CompiledStep` hands the graph its state in
    that layout too (a fresh state's channels-last frames are copied once, at the first call).
    """

    def step(x: Any, state: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        y, new = module.step_stride(x, state)
        return y, {**new, "tree": tree_map(_row_major, new["tree"])}

    # a fresh code object per compiled module: dynamo keeps its compiled graphs and counts
    # recompilations per code object, so sharing one would make every further module a
    # "recompilation" and fail after ``torch._dynamo.config.recompile_limit`` of them
    return types.FunctionType(step.__code__.replace(), step.__globals__, "step_stride", None,
                              step.__closure__)


def _row_major(t: Tensor) -> Tensor:
    return t.clone(memory_format=torch.contiguous_format)


def _as_row_major(t: Any) -> Any:
    """``t`` in the row-major layout (a copy only where it is not)."""
    return t.contiguous() if isinstance(t, Tensor) and not t.is_contiguous() else t


#: Why :func:`compile_step` steps eagerly on a CPU unless forced (measured, see the docs).
CPU_FALLBACK_REASON = (
    "torch.compile'd steps measured slower than eager stepping on the CPU (TCN step 3.9x "
    "slower, benchmarks/results/compiled_step.md); compile_step(..., force=True) compiles "
    "anyway")


class CompiledStep:
    """A compiled stride step; ``compiled`` is True, ``reason`` None (see :class:`EagerStep`
    for the eager fallback, which has the same attributes)."""

    backend = "compiled"

    def __init__(self, fn: Callable[[Any, dict], tuple[Any, dict]], rnn: bool,
                 stride: int = 1) -> None:
        self.fn = fn
        self.compiled = True
        self.reason: str | None = None
        self._rnn = rnn
        self._stride = stride

    def __call__(self, x: Any, state: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        from ._backends import _check_frames

        _check_frames(self.backend, x, state, self._stride)
        state = {**state, "tree": tree_map(_as_row_major, state["tree"])}
        if self._rnn:
            with torch._dynamo.config.patch(allow_rnn=True):
                return self.fn(x, state)
        return self.fn(x, state)


def _on_cpu(module: nn.Module) -> bool:
    ref = next(module.parameters(), None)
    if ref is None:
        ref = next(module.buffers(), None)
    return ref is None or ref.device.type == "cpu"


def compile_step(module: CoModule, *, mode: str | None = None, fullgraph: bool = True,
                 backend: str | Callable = "inductor", dynamic: bool | None = False,
                 options: dict[str, Any] | None = None,
                 force: bool = False) -> Callable[[Any, dict], tuple[Any, dict]]:
    """``torch.compile`` :meth:`CoModule.step_stride` (one output per ``stride`` frames).

    Args:
        module: the continual module (stepping needs eval mode where it has dropout).
        mode: ``torch.compile`` mode; ``"reduce-overhead"`` adds CUDA graph capture on a GPU.
        fullgraph: fail on a graph break instead of running pieces eagerly (default).
        backend: the ``torch.compile`` backend.
        dynamic: ``torch.compile``'s dynamic-shape option (default ``False``: a batch size
            or frame size met later compiles a graph of its own).
        options: ``torch.compile``'s backend options (not together with ``mode``).
        force: compile with inductor on a CPU too. Without it, a module on the CPU gets the
            eager step (:class:`EagerStep`) and a ``RuntimeWarning`` that says why
            (:data:`CPU_FALLBACK_REASON`): compiled CPU steps measured slower than eager ones.

    The returned function has the signature of ``step_stride``:
    ``(frames (B, C, stride, ...), state) -> (y, state)``, starting from
    :meth:`CoModule.init_state`. Its attribute ``compiled`` says which path was taken and
    ``reason`` why a fallback happened (``None`` when compiled). Every module gets its own
    compiled code, so any number of modules can be compiled in one process. Modules holding
    an ``nn.RNN``/``LSTM``/``GRU`` are traced with ``torch._dynamo.config.allow_rnn``
    switched on for their calls only.

    Example:
        >>> import torch, costream as cs
        >>> from costream.runtime import compile_step
        >>> net = cs.Sequential(cs.Conv1d(2, 4, 3, padding=1), torch.nn.ReLU())
        >>> step = compile_step(net, backend="eager")  # dynamo's graph, run eagerly
        >>> state = net.init_state(1)
        >>> y, state = step(torch.randn(1, 2, 1), state)
        >>> y.shape, step.compiled
        (torch.Size([1, 4]), True)
    """
    if not isinstance(module, CoModule):
        raise TypeError(f"compile_step needs a continual module (use costream.continual "
                        f"first), got {type(module).__name__}")
    if not getattr(module, "streamable", True):
        raise ValueError(f"{type(module).__name__} is an offline model (streamable=False): "
                         f"it has no step function to compile")
    inductor = backend == "inductor"
    if inductor and not force and _on_cpu(module):
        from ._backends import EagerStep

        warnings.warn(f"compile_step runs the eager step: {CPU_FALLBACK_REASON}",
                      RuntimeWarning, stacklevel=_user_level())
        return EagerStep(module, reason=CPU_FALLBACK_REASON)
    compiled = torch.compile(_stride_step(module), mode=mode, fullgraph=fullgraph,
                             backend=backend, dynamic=dynamic, options=options)
    return CompiledStep(compiled, any(isinstance(m, nn.RNNBase) for m in module.modules()),
                        module.temporal.stride)


def _user_level() -> int:
    """``stacklevel`` of the first caller outside ``costream.runtime`` (a warning raised for
    ``make_step`` or ``StreamEngine`` then points at the user's line, not at ours)."""
    here = os.path.dirname(os.path.abspath(__file__))
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.dirname(os.path.abspath(frame.f_code.co_filename)) == here:
        frame, level = frame.f_back, level + 1
    return level
