"""Branching containers: :class:`Parallel`, :class:`BroadcastReduce` and :class:`Residual`.

All three share one implementation of branch alignment. Offline, branch outputs of different
lengths are cropped to the shortest (centred, or keeping the end with ``align="end"``). Online,
each branch's output is held back by the steps that make its frames line up with the slowest
branch; a delay line of frame references per branch does it, with no copies.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ..core._mode import call_mode
from ..core._module import Age, CoModule, advance, emits, shift
from ..core._temporal import Temporal
from ._frame import ReduceOp, reduce_fn
from ._pointwise import pointwise_step
from ._sequential import as_child, child_temporal

Align = Literal["centre", "end"]


class _Branches(CoModule):
    """Shared implementation; see :class:`Parallel`, :class:`BroadcastReduce`, :class:`Residual`."""

    def __init__(self, branches: Any, *, broadcast: bool, reduce: ReduceOp | None,
                 align: Align = "centre") -> None:
        super().__init__()
        items = branches.items() if isinstance(branches, OrderedDict) else (
            (str(i), m) for i, m in enumerate(branches))
        for name, m in items:
            self.add_module(name, as_child(m, name))
        if len(self._modules) < 1:
            raise ValueError(f"{type(self).__name__} needs at least one branch")
        if align not in ("centre", "end"):
            raise ValueError(f"align must be 'centre' or 'end', got {align!r}")
        self.broadcast = broadcast
        self.reduce = reduce
        self.align = align
        self._reduce = reduce_fn(reduce) if reduce is not None else None
        self._prepare()

    def extra_repr(self) -> str:
        return f"reduce={self.reduce!r}, align={self.align!r}" if self.reduce else \
            f"align={self.align!r}"

    # ------------------------------------------------------------------ geometry
    def _prepare(self) -> None:
        mods = list(self._modules.values())
        ts = [child_temporal(m) for m in mods]
        strides = {t.stride for t in ts}
        if len(strides) > 1:
            raise ValueError(f"{type(self).__name__} branches must share a temporal stride, "
                             f"got {[t.stride for t in ts]}")
        s = ts[0].stride
        e_min = min(t.extent for t in ts)
        crops = []
        for i, t in enumerate(ts):
            if (t.extent - e_min) % s:
                raise ValueError(f"branch {i} output length differs from the others by a "
                                 f"non-integer number of strided frames")
            extra = (t.extent - e_min) // s
            crops.append(extra // 2 if self.align == "centre" else extra)
        delay = max(t.delay + c * s for t, c in zip(ts, crops))
        pad = max(t.padding - c * s for t, c in zip(ts, crops))
        self._geom = Temporal(delay + pad + 1, s, pad, e_min + delay)
        self._lines = [divmod(delay - t.delay - c * s, s) for t, c in zip(ts, crops)]
        self._child_t = ts
        self._plan = [(isinstance(m, CoModule), m._step if isinstance(m, CoModule)
                       else pointwise_step(m)) for m in mods]

    def _temporal(self) -> Temporal:
        return self._geom

    def _input_spec(self) -> tuple[int | None, int | None]:
        if not self.broadcast:
            return None, None
        for m in self._modules.values():
            if isinstance(m, CoModule):
                spec = m._input_spec()
                if spec != (None, None):
                    return spec
        return None, None

    # ------------------------------------------------------------------ state
    def _init(self, batch: int, shape: Any, device: torch.device, dtype: torch.dtype):
        states, lines, holds, shapes = [], [], [], []
        for i, m in enumerate(self._modules.values()):
            in_shape = shape if self.broadcast else shape[i]
            if isinstance(m, CoModule):
                st, out = m._init(batch, in_shape, device, dtype)
            else:
                st, out = None, in_shape
            states.append(st)
            shapes.append(out)
            n, r = self._lines[i]
            zeros = [torch.zeros(batch, *out, device=device, dtype=dtype) for _ in range(n + 1)]
            lines.append(tuple(zeros[:n]))
            holds.append(zeros[n] if r else None)
        if self.reduce == "concat":
            out_shape: Any = (sum(s[0] for s in shapes), *shapes[0][1:])
        elif self.reduce is not None:
            if len({tuple(s) for s in shapes}) > 1:
                raise ValueError(f"cannot {self.reduce} branch outputs of shapes {shapes}")
            out_shape = shapes[0]
        else:
            out_shape = tuple(shapes)
        return (tuple(states), tuple(lines), tuple(holds)), out_shape

    def _combine(self, outs: Sequence[Any]) -> Any:
        return self._reduce(outs) if self._reduce is not None else tuple(outs)

    def _push(self, i: int, y: Tensor, lines: list, holds: list) -> Tensor | None:
        """Push branch ``i``'s new output into its delay line; return the aligned frame now due."""
        n, r = self._lines[i]
        if n:
            line = lines[i]
            y, lines[i] = line[0], (*line[1:], y)
        if r:
            holds[i] = y
            return None
        return y

    # ------------------------------------------------------------------ steps
    def _step(self, x: Any, state: tuple, age: Age, phase: int):
        cst, lines, holds = (list(v) for v in state)
        cur: list[Any] = [None] * len(cst)
        for i, (co, fn) in enumerate(self._plan):
            xi = x if self.broadcast else x[i]
            if co:
                y, cst[i], _, _ = fn(xi, cst[i], age, phase)
            else:
                y = fn(xi)
            if y is not None:
                cur[i] = self._push(i, y, lines, holds)
        new = (tuple(cst), tuple(lines), tuple(holds))
        g = self._geom
        if not emits(phase, g.delay, g.stride):
            return None, new, None, 0
        out_age, out_phase = advance(age, phase, g.delay, g.stride)
        if isinstance(out_age, int) and out_age < 0:
            return None, new, None, 0
        outs = [holds[i] if r else cur[i] for i, (_, r) in enumerate(self._lines)]
        return self._combine(outs), new, out_age, out_phase

    def _steps(self, x: Any, state: tuple, age: Age, phase: int):
        if isinstance(age, Tensor):
            return super()._steps(x, state, age, phase)
        cst = list(state[0])
        chunks = []
        for i, m in enumerate(self._modules.values()):
            xi = x if self.broadcast else x[i]
            if isinstance(m, CoModule):
                y, cst[i], a, p = m._steps(xi, cst[i], age, phase)
            else:
                y, a, p = self._plan[i][1](xi), age, phase
            chunks.append((y, a, p))
        t = (x if self.broadcast else x[0]).shape[2]
        return self._replay(chunks, (tuple(cst), *state[1:]), age, phase, t)

    def _flush(self, state: tuple, age: Age, phase: int):
        cst = list(state[0])
        chunks = []
        for i, m in enumerate(self._modules.values()):
            if isinstance(m, CoModule):
                y, cst[i], a, p = m._flush(cst[i], age, phase)
            else:
                y, a, p = None, None, 0
            chunks.append((y, a, p))
        return self._replay(chunks, (tuple(cst), *state[1:]), age, phase, None)

    def _replay(self, chunks: list, state: tuple, age: Age, phase: int, length: int | None):
        """Push branch output chunks in their emission order and collect the aligned outputs.

        Branch outputs are placed on the timeline of this module's input frames (offset ``tau``
        from ``(age, phase)``); ``length=None`` (flushing) runs until a branch runs dry.
        """
        g = self._geom
        s = g.stride
        lines, holds = list(state[1]), list(state[2])
        timeline: dict[int, list[tuple[int, Tensor]]] = {}
        last_push = []
        horizon = 0
        budget = None  # flushing: emissions left before a branch runs out of real frames
        for i, (y, a, _) in enumerate(chunks):
            d = self._child_t[i].delay
            n, r = self._lines[i]
            u = (phase - d) % s
            last_push.append(-u if u else -s)
            frames = [] if y is None else list(y.unbind(2))
            if length is None:
                # the delay line still holds n real frames: push fillers to move them out
                pending = 1 if r and last_push[i] + r >= 0 else 0
                left = pending + n + len(frames)
                budget = left if budget is None else min(budget, left)
                frames += [lines[i][0]] * n if n else []
            if not frames:
                continue
            first = d + a * s - age if (isinstance(age, int) and y is not None) else (
                d - phase) % s
            for k, f in enumerate(frames):
                timeline.setdefault(first + k * s, []).append((i, f))
            horizon = max(horizon, first + len(frames) * s)
        if length is not None:
            horizon = length
        outs, out_first = [], (None, 0)
        cur: list[Any] = [None] * len(chunks)
        for tau in range(horizon + s):
            if length is not None and tau >= length:
                break
            for i, y in timeline.get(tau, ()):
                cur[i] = self._push(i, y, lines, holds)
                last_push[i] = tau
            if not emits(phase + tau, g.delay, s):
                continue
            if budget is not None:
                if budget == 0:
                    break
                budget -= 1
            a, p = shift(age, phase, tau)
            out_age, out_phase = advance(a, p, g.delay, s)
            if isinstance(out_age, int) and out_age < 0:
                continue
            late = [i for i, (_, r) in enumerate(self._lines) if last_push[i] != tau - r]
            if late:
                self._out_of_step(late, tau, last_push)
            if not outs:
                out_first = (out_age, out_phase)
            outs.append(self._combine([holds[i] if r else cur[i]
                                       for i, (_, r) in enumerate(self._lines)]))
        new = (state[0], tuple(lines), tuple(holds))
        if not outs:
            return None, new, None, 0
        if isinstance(outs[0], tuple):
            y = tuple(torch.stack([o[j] for o in outs], 2) for j in range(len(outs[0])))
        else:
            y = torch.stack(outs, 2)
        return y, new, *out_first

    def _out_of_step(self, late: list[int], tau: int, last_push: list[int]) -> None:
        names = list(self._modules)
        detail = ", ".join(
            f"branch '{names[i]}' ({type(self._modules[names[i]]).__name__}, "
            f"{self._child_t[i]}) last emitted at frame {last_push[i]} of this call, expected "
            f"frame {tau - self._lines[i][1]}" for i in late)
        raise RuntimeError(
            f"{type(self).__name__}: branch outputs do not line up with the branches' temporal "
            f"geometry ({detail}). A branch emits outputs at other frames than its `temporal` "
            f"says: check custom modules' `_temporal` and that their kernel sizes, strides and "
            f"paddings are integers")

    # ------------------------------------------------------------------ offline
    def _clip(self, x: Any) -> Any:
        ys = []
        with call_mode("forward"):  # children through __call__, so their hooks run
            for i, m in enumerate(self._modules.values()):
                ys.append(m(x if self.broadcast else x[i]))
        length = min(y.shape[2] for y in ys)
        cropped = []
        for y in ys:
            extra = y.shape[2] - length
            c = extra // 2 if self.align == "centre" else extra
            cropped.append(y[:, :, c: c + length] if extra else y)
        return self._combine(cropped)


class Parallel(_Branches):
    """Apply module ``i`` to input ``i`` of a tuple; outputs are aligned in time.

    Example:
        >>> import torch, costream as cs
        >>> par = cs.Parallel(cs.Conv1d(2, 2, 3), cs.Delay(0))
        >>> a, b = par((torch.randn(1, 2, 6), torch.randn(1, 2, 6)))
        >>> a.shape, b.shape  # the longer branch is cropped to the shorter, centred
        (torch.Size([1, 2, 4]), torch.Size([1, 2, 4]))
    """

    def __init__(self, *modules: nn.Module | OrderedDict, align: Align = "centre") -> None:
        super().__init__(_branch_arg(modules), broadcast=False, reduce=None, align=align)


class BroadcastReduce(_Branches):
    """Feed one input to every branch and reduce the aligned outputs.

    ``reduce`` is ``"sum"``, ``"mul"``, ``"max"`` or ``"concat"`` (channels).

    Example:
        >>> import torch, costream as cs
        >>> inception = cs.BroadcastReduce(cs.Conv1d(4, 8, 1), cs.Conv1d(4, 8, 3, padding=1),
        ...                                cs.Conv1d(4, 8, 5, padding=2), reduce="concat")
        >>> inception.delay  # the k=5 branch is the slowest; the others are delayed to match
        2
        >>> x = torch.randn(1, 4, 12)
        >>> torch.allclose(inception.forward_steps(x, pad_end=True), inception(x), atol=1e-6)
        True
    """

    def __init__(self, *modules: nn.Module | OrderedDict, reduce: ReduceOp = "sum",
                 align: Align = "centre") -> None:
        super().__init__(_branch_arg(modules), broadcast=True, reduce=reduce, align=align)


class Residual(_Branches):
    """``module(x) + shortcut(x)``, with the shortcut aligned to the module's output.

    Around an unpadded module the shortcut is cropped offline (``align="centre"``: centred;
    ``"end"``: the last frames) and delayed online to match.

    Example:
        >>> import torch, costream as cs
        >>> res = cs.Residual(cs.Conv1d(4, 4, 3))  # unpadded: the shortcut is centre-cropped
        >>> x = torch.randn(1, 4, 10)
        >>> res(x).shape, res.delay
        (torch.Size([1, 4, 8]), 2)
        >>> torch.allclose(res.forward_steps(x, pad_end=True), res(x), atol=1e-6)
        True
    """

    def __init__(self, module: nn.Module, shortcut: nn.Module | None = None, *,
                 reduce: ReduceOp = "sum", align: Align = "centre") -> None:
        super().__init__([module, shortcut if shortcut is not None else nn.Identity()],
                         broadcast=True, reduce=reduce, align=align)


def _branch_arg(modules: tuple) -> Any:
    if len(modules) == 1 and isinstance(modules[0], OrderedDict):
        return modules[0]
    return list(modules)
