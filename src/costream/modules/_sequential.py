"""Continual :class:`Sequential`: a chain of continual and point-wise modules."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..core._mode import call_mode
from ..core._module import Age, CoModule, advance, shift
from ..core._temporal import Temporal
from ._conv import HANDED
from ._fusion import fuse_plan
from ._pointwise import is_pointwise, pointwise_step


def as_child(module: nn.Module, name: str = "") -> nn.Module:
    """Validate a container child: a continual module, a point-wise one, or convertible."""
    if isinstance(module, CoModule) or is_pointwise(module):
        return module
    from ..convert import convert_child

    return convert_child(module, name)


def child_temporal(module: nn.Module) -> Temporal:
    return module.temporal if isinstance(module, CoModule) else Temporal()


def next_out(age: Age, phase: int, t: Temporal) -> tuple[Age, int]:
    """``(age, phase)`` of the next output of a module whose next input has ``(age, phase)``."""
    first = (t.delay - phase) % t.stride
    a, p = shift(age, phase, first)
    return advance(a, p, t.delay, t.stride)


def cat_chunks(parts: list[Any]) -> Any:
    """Concatenate chunks (tensors or tuples of tensors) along time, skipping ``None``."""
    parts = [p for p in parts if p is not None]
    if not parts:
        return None
    if len(parts) == 1:
        return parts[0]
    if isinstance(parts[0], tuple):
        return tuple(torch.cat([p[i] for p in parts], dim=2) for i in range(len(parts[0])))
    return torch.cat(parts, dim=2)


class Sequential(CoModule, nn.Sequential):
    """Chain modules; temporal properties and delays follow from the children.

    Children are continual modules or point-wise ``torch.nn`` modules (activations, eval-mode
    batch norm, dropout); other ``torch.nn`` modules are converted with :func:`continual`.
    Accepts modules or one ``OrderedDict`` like :class:`torch.nn.Sequential`.

    Example:
        >>> import torch, costream as cs
        >>> net = cs.Sequential(cs.Conv1d(2, 8, 3, padding=1), torch.nn.ReLU(), cs.Conv1d(8, 4, 3))
        >>> net.receptive_field, net.delay  # the first conv is padded: its output is due earlier
        (5, 3)
        >>> x = torch.randn(1, 2, 16)
        >>> torch.allclose(net.forward_steps(x, pad_end=True), net(x), atol=1e-6)
        True
    """

    def __init__(self, *args: Any) -> None:
        nn.Sequential.__init__(self, *args)
        for name, child in list(self._modules.items()):
            self._modules[name] = as_child(child, name)
        self._prepare()

    def _prepare(self) -> None:
        modules = list(self._modules.values())
        self._plan = [(i, isinstance(m, CoModule), m._step if isinstance(m, CoModule)
                       else pointwise_step(m)) for i, m in enumerate(modules)]
        # single steps run conv -> batch norm -> activation triples fused (see _fusion)
        self._step_plan = fuse_plan(modules, self._plan)
        # the paired convs among the steps: handed their input as their own where it is an
        # intermediate of the step (no copy into their state)
        self._hands = [m if getattr(m, "_paired", False) else None
                       for m in (modules[i] for i, _, _ in self._step_plan)]
        self._handing = any(m is not None for m in self._hands)

    def _temporal(self) -> Temporal:
        t = Temporal()
        for m in self._modules.values():
            if isinstance(m, CoModule):
                t = t.then(m.temporal)
        return t

    def _input_spec(self) -> tuple[int | None, int | None]:
        for m in self._modules.values():
            if isinstance(m, CoModule):
                return m._input_spec()
        return None, None

    def _init(self, batch: int, shape: Any, device: torch.device, dtype: torch.dtype):
        states = []
        for m in self._modules.values():
            if isinstance(m, CoModule):
                st, shape = m._init(batch, shape, device, dtype)
                states.append(st)
            else:
                states.append(None)
        return tuple(states), shape

    def _step(self, x: Any, state: tuple, age: Age, phase: int):
        new = list(state)
        # an input that shares no memory with the step's input x0 was made within this step,
        # and a Sequential passes it to the next module only: a paired conv may keep it
        handing = (self._handing and isinstance(x, Tensor) and not torch.compiler.is_compiling()
                   and not torch.compiler.is_exporting())
        base = x.untyped_storage().data_ptr() if handing else None
        for (i, co, fn), conv in zip(self._step_plan, self._hands):
            if co:
                if (handing and conv is not None and isinstance(x, Tensor)
                        and x.untyped_storage().data_ptr() != base):
                    HANDED.entry = (x, conv)
                    try:
                        x, new[i], age, phase = fn(x, new[i], age, phase)
                    finally:
                        HANDED.entry = None
                else:
                    x, new[i], age, phase = fn(x, new[i], age, phase)
                if x is None:
                    return None, tuple(new), None, 0
            else:
                x = fn(x)
        return x, tuple(new), age, phase

    def _steps(self, x: Any, state: tuple, age: Age, phase: int):
        new = list(state)
        for i, m in enumerate(self._modules.values()):
            if isinstance(m, CoModule):
                x, new[i], age, phase = m._steps(x, new[i], age, phase)
                if x is None:
                    return None, tuple(new), None, 0
            else:
                x = self._plan[i][2](x)
        return x, tuple(new), age, phase

    def _flush(self, state: tuple, age: Age, phase: int):
        new = list(state)
        y: Any = None
        y_age: Age = None
        y_phase = 0
        for i, m in enumerate(self._modules.values()):
            if not isinstance(m, CoModule):
                y = None if y is None else self._plan[i][2](y)
                continue
            following = next_out(age, phase, m.temporal)
            parts, first = [], None
            if y is not None:
                fed = (y[0] if isinstance(y, tuple) else y).shape[2]
                age, phase = y_age, y_phase
                following = next_out(age, phase, m.temporal)
                y, new[i], a, p = m._steps(y, new[i], age, phase)
                if y is not None:
                    parts.append(y)
                    first = (a, p)
                age, phase = shift(age, phase, fed)
            y, new[i], a, p = m._flush(new[i], age, phase)
            if y is not None:
                parts.append(y)
                first = first or (a, p)
            y = cat_chunks(parts)
            y_age, y_phase = first if first else (None, 0)
            age, phase = following
        return y, tuple(new), y_age, y_phase

    def _clip(self, x: Any) -> Any:
        with call_mode("forward"):  # children through __call__, so their hooks run
            for m in self._modules.values():
                x = m(x)
        return x
