"""Continual :class:`Conditional`: run one of two branches, chosen per call."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ..core._mode import call_mode
from ..core._module import Age, CoModule, advance
from ..core._temporal import Temporal
from ._pointwise import pointwise_step
from ._sequential import as_child, child_temporal


class Conditional(CoModule):
    """Run ``on_true`` when ``predicate(self, x)`` holds, else ``on_false`` (identity if ``None``).

    Both branches are aligned to the larger delay, so switching keeps outputs in time; the
    branch not chosen is not stepped. ``predicate`` should depend on configuration (e.g.
    ``self.training``), not on tensor values, to keep the step traceable.

    Example:
        >>> import torch, costream as cs
        >>> cond = cs.Conditional(lambda m, x: not m.training, cs.Conv1d(2, 2, 3, padding=1))
        >>> cond.eval().delay
        1
    """

    def __init__(self, predicate: Callable[[nn.Module, Any], bool], on_true: nn.Module,
                 on_false: nn.Module | None = None) -> None:
        super().__init__()
        self.predicate = predicate
        self.add_module("0", as_child(on_true, "0"))
        self.add_module("1", as_child(on_false if on_false is not None else nn.Identity(), "1"))
        self._prepare()

    def _prepare(self) -> None:
        ts = [child_temporal(m) for m in self._modules.values()]
        if ts[0].stride != ts[1].stride:
            raise ValueError(f"Conditional branches must share a stride, got "
                             f"{ts[0].stride} and {ts[1].stride}")
        s = ts[0].stride
        d = max(t.delay for t in ts)
        if any((d - t.delay) % s for t in ts):
            raise ValueError("Conditional branch delays must differ by a multiple of the stride")
        self._n = [(d - t.delay) // s for t in ts]
        widest = max(ts, key=lambda t: t.receptive_field)
        self._geom = Temporal(d + widest.padding + 1, s, widest.padding, widest.end_padding)
        self._child_t = ts
        self._fns = [m._step if isinstance(m, CoModule) else pointwise_step(m)
                     for m in self._modules.values()]

    def _temporal(self) -> Temporal:
        return self._geom

    def _input_spec(self) -> tuple[int | None, int | None]:
        m = self._modules["0"]
        return m._input_spec() if isinstance(m, CoModule) else (None, None)

    def _init(self, batch: int, shape: Any, device: torch.device, dtype: torch.dtype):
        states, lines, out = [], [], shape
        for i, m in enumerate(self._modules.values()):
            st, o = m._init(batch, shape, device, dtype) if isinstance(m, CoModule) else (None,
                                                                                           shape)
            out = o if i == 0 else out
            states.append(st)
            lines.append(tuple(torch.zeros(batch, *o, device=device, dtype=dtype)
                               for _ in range(self._n[i])))
        return (tuple(states), tuple(lines)), out

    def _choice(self, x: Any) -> int:
        return 0 if self.predicate(self, x) else 1

    def _step(self, x: Any, state: tuple, age: Age, phase: int):
        i = self._choice(x)
        m = self._modules[str(i)]
        states, lines = list(state[0]), list(state[1])
        if isinstance(m, CoModule):
            y, states[i], _, _ = m._step(x, states[i], age, phase)
        else:
            y = self._fns[i](x)
        if y is not None and self._n[i]:
            line = lines[i]
            y, lines[i] = line[0], (*line[1:], y)
        new = (tuple(states), tuple(lines))
        if y is None:
            return None, new, None, 0
        out_age, out_phase = advance(age, phase, self._geom.delay, self._geom.stride)
        if isinstance(out_age, int) and out_age < 0:
            return None, new, None, 0
        return y, new, out_age, out_phase

    def _flush(self, state: tuple, age: Age, phase: int):
        i = self._choice(None)
        m = self._modules[str(i)]
        states, lines = list(state[0]), list(state[1])
        y = None
        if isinstance(m, CoModule):
            y, states[i], _, _ = m._flush(states[i], age, phase)
        parts = list(lines[i])
        if y is not None:
            parts.extend(y.unbind(2))
        n = self._n[i]
        # the held frames come out first; the last n pushed stay behind as (unused) line state
        emitted = parts[:len(parts)] if n else parts
        new = (tuple(states), tuple(lines))
        if not emitted:
            return None, new, None, 0
        first_age, first_phase = advance(age, phase, self._geom.delay, self._geom.stride)
        if first_age is not None and not isinstance(first_age, Tensor):
            # int mode: drop held frames from before the stream started
            keep = [f for k, f in enumerate(emitted) if first_age + k >= 0]
            if not keep:
                return None, new, None, 0
            first_age = first_phase = max(first_age, 0)
            emitted = keep
        return torch.stack(emitted, 2), new, first_age, first_phase

    def _clip(self, x: Any) -> Any:
        m = self._modules[str(self._choice(x))]
        with call_mode("forward"):
            return m(x)
