"""Continual :class:`Graph`: a directed acyclic graph of continual and point-wise operations.

This is the container that :func:`costream.continual` builds from a traced ``forward`` (see
``docs/converting.md``). Each node holds a value per step: a frame (the time axis removed) while
stepping, or a chunk (the time axis kept where the source model has it) while stepping many
frames or flushing. Node kinds:

* ``input``: the stream entering the graph;
* ``static``: a value that does not depend on the stream (parameters, constants);
* ``co``: a continual module (convolution, pool, delay, window reduction...);
* ``fn``: an operation that acts on each time step on its own (activations, element-wise
  arithmetic, concatenation along channels, reshapes that keep time separate...). With several
  stream inputs it is a *join*: inputs that emit the same output index at different steps are
  aligned with delay lines of frame references, so they meet exactly as in the offline graph;
* ``crop``: drops the last frames of a stream (the causal "chomp" ``x[:, :, :-n]``). Those
  frames only exist in the end padding, so online the crop is the identity and the flush drops
  them.

Timing follows one rule: a node ``v`` with cumulative geometry ``G_v`` (from the graph input)
emits its output ``j`` at input step ``j * G_v.stride + G_v.delay``; ``count(v, a)`` outputs are
out before input step ``a``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, fx, nn

from ..core._mode import call_mode
from ..core._module import Age, CoModule, advance, shift
from ..core._temporal import Temporal
from ._sequential import next_out


class Node:
    """One operation of a :class:`Graph` (built by the converter, not by hand)."""

    __slots__ = ("args", "co", "fast", "fn", "fuse", "geometry", "index", "keep_axis", "kind",
                 "kwargs", "lines", "name", "source", "streams", "time_axis", "virtual",
                 "where")

    def __init__(self, index: int, name: str, kind: str) -> None:
        self.index = index
        self.name = name
        self.kind = kind
        self.fn: Callable[..., Any] | None = None
        self.args: tuple = ()
        self.kwargs: dict = {}
        self.co: CoModule | None = None
        self.source = -1            # the stream input of a co / crop node
        self.streams: list[int] = []  # stream inputs of an fn node
        self.time_axis: int | None = None  # of the chunk (source layout); None: no time axis
        self.keep_axis: int | None = None  # co: re-insert a size-1 time axis at this position
        self.virtual = False       # a per-step value without a time axis (after a window)
        self.geometry = Temporal()
        self.lines: list[tuple[int, int]] = []  # joins: (stream input, line length)
        self.fast = False          # fn applies to frames as they are
        self.where = ""            # module path / source line, for messages
        self.fuse: tuple | None = None  # co: (conv, start, end) of a conv with F.pad folded in


class Ref:
    """A reference to a node's value inside an ``fn`` node's arguments."""

    __slots__ = ("index",)

    def __init__(self, index: int) -> None:
        self.index = index

    def __repr__(self) -> str:
        return f"%{self.index}"


def _map(obj: Any, fn: Callable[[int], Any]) -> Any:
    if isinstance(obj, Ref):
        return fn(obj.index)
    if isinstance(obj, tuple):
        return tuple(_map(o, fn) for o in obj)
    if isinstance(obj, list):
        return [_map(o, fn) for o in obj]
    if isinstance(obj, dict):
        return {k: _map(v, fn) for k, v in obj.items()}
    if isinstance(obj, slice):
        return slice(_map(obj.start, fn), _map(obj.stop, fn), _map(obj.step, fn))
    return obj


def count(g: Temporal, a: int) -> int:
    """Outputs a node of cumulative geometry ``g`` has emitted before input step ``a``."""
    return max(0, -((g.delay - a) // g.stride))


class Graph(CoModule):
    """A continual DAG: the result of converting a model with a custom ``forward``.

    Built by :func:`costream.continual`; the module tree mirrors the source model, so
    ``state_dict`` keys are the source's. Offline, ``forward`` runs the traced source graph.
    ``time_dim`` is where the source model keeps time in its input (and in its output, where it
    has one); frames given to :meth:`forward_step` are input clips with that axis removed.

    Example:
        >>> import torch, costream as cs
        >>> class Block(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.conv = torch.nn.Conv1d(4, 4, 3, padding=1)
        ...     def forward(self, x):
        ...         return torch.relu(self.conv(x)) + x
        >>> net = cs.continual(Block())
        >>> type(net).__name__, net.delay
        ('Graph', 1)
        >>> x = torch.randn(1, 4, 12)
        >>> torch.allclose(net.forward_steps(x, pad_end=True), net(x), atol=1e-6)
        True
    """

    def __init__(self, nodes: Sequence[Node], output: int, offline: fx.Graph,
                 time_dim: int = 2, input_spec: tuple[int | None, int | None] = (None, None)
                 ) -> None:
        super().__init__()
        self._nodes = list(nodes)
        self._output = output
        self._offline = offline
        self.time_dim = time_dim
        self._spec = input_spec
        self._virtual = any(n.virtual for n in self._nodes)
        self._meta: dict[int, Any] = {}  # last values of nodes without time (e.g. sizes)
        # clips (B, T) without a channel axis step as frames (B, 1): the contract's (B, C, T)
        self._flat = time_dim == 1 and input_spec[0] == 1
        if self._flat:
            self._spec = (2, 1)
        self._prepare()

    # ------------------------------------------------------------------ geometry
    def _prepare(self) -> None:
        """Slots of the continual nodes and join lines in the state, and the step plan."""
        co_slot: dict[int, int] = {}
        line_slot: dict[tuple[int, int], int] = {}
        plan: list[tuple] = []
        joins = []
        for n in self._nodes:
            i = n.index
            if n.kind == "co":
                if n.fuse is not None:  # rebuilt from the conv: it may have been pruned
                    from ._window import fuse_pad

                    n.co = fuse_pad(*n.fuse)
                n.co._prepare()
                co_slot[i] = len(co_slot)
                plan.append((0, i, n.source, (co_slot[i], n.co._step), n.keep_axis))
            elif n.kind == "input":
                plan.append((2, i, -1, None, None))
            elif n.kind == "static":
                plan.append((3, i, -1, None, n.fn))
            elif n.kind == "crop":
                plan.append((4, i, n.source, None, None))
            elif n.lines:
                entries = []
                for j, length in n.lines:
                    line_slot[(i, j)] = len(line_slot)
                    entries.append((j, length, line_slot[(i, j)], self._nodes[j].geometry))
                joins.append((i, tuple(entries), self._caller(n)))
            else:
                rest = tuple(n.streams[1:])
                plan.append((1, i, n.streams[0], rest, self._caller(n)))
        self._co_slot, self._line_slot = co_slot, line_slot
        self._geom = self._nodes[self._output].geometry
        s = self._geom.stride
        self._horizon = max(n.geometry.delay for n in self._nodes) + 2 * s
        for i, entries, call in joins:  # steady state: picks depend on the phase only
            table = tuple(self._join_picks(i, entries, self._ages(None, p)) for p in range(s))
            plan.append((5, i, -1, None, (entries, call, table)))
        plan.sort(key=lambda e: e[1])
        self._plan = plan

    def _join_picks(self, i: int, entries: tuple, a0: int) -> tuple[bool, tuple[int, ...]]:
        """Whether join ``i`` emits at input step ``a0``, and the position in each input's
        line (followed by the new frame) of the frame it combines."""
        g = self._nodes[i].geometry
        done = count(g, a0)
        due = count(g, a0 + 1) > done
        return due, tuple(length - count(gj, a0) + done for _, length, _, gj in entries)

    def _caller(self, n: Node) -> Callable[[list], Any]:
        """``vals -> value`` of an ``fn`` node on frames, without generic argument mapping
        for the common shapes (one or two node arguments, or one and a constant)."""
        fn, args = n.fn, n.args
        if n.fast and not n.kwargs:
            if len(args) == 1 and isinstance(args[0], Ref):
                a = args[0].index
                return lambda v: fn(v[a])
            if len(args) == 2 and isinstance(args[0], Ref):
                a = args[0].index
                if isinstance(args[1], Ref):
                    b = args[1].index
                    return lambda v: fn(v[a], v[b])
                c = args[1]
                if not isinstance(c, (tuple, list, dict, slice)):
                    return lambda v: fn(v[a], c)
        return lambda v: self._apply_frame(n, v.__getitem__)

    def _temporal(self) -> Temporal:
        return self._geom

    def _input_spec(self) -> tuple[int | None, int | None]:
        return self._spec

    def extra_repr(self) -> str:
        kinds: dict[str, int] = {}
        for n in self._nodes:
            kinds[n.kind] = kinds.get(n.kind, 0) + 1
        return f"nodes={len(self._nodes)}, time_dim={self.time_dim}, " + ", ".join(
            f"{k}={v}" for k, v in sorted(kinds.items()))

    # ------------------------------------------------------------------ state
    def _init(self, batch: int, shape: Any, device: torch.device, dtype: torch.dtype):
        """States of the continual nodes and join lines; frame shapes by a dry run on zeros."""
        frames: list[Any] = [None] * len(self._nodes)
        states: list[Any] = [None] * len(self._co_slot)
        lines: list[Any] = [None] * len(self._line_slot)
        with torch.no_grad():
            for n in self._nodes:
                if n.kind == "input":
                    frames[n.index] = torch.zeros(batch, *shape, device=device, dtype=dtype)
                    if self._flat:
                        frames[n.index] = frames[n.index].view(batch)
                elif n.kind == "static":
                    frames[n.index] = self._static(n)
                elif n.kind == "co":
                    st, out = n.co._init(batch, tuple(frames[n.source].shape[1:]), device, dtype)
                    states[self._co_slot[n.index]] = st
                    y = torch.zeros(batch, *out, device=device, dtype=dtype)
                    frames[n.index] = y if n.keep_axis is None else y.unsqueeze(n.keep_axis)
                elif n.kind == "crop":
                    frames[n.index] = frames[n.source]
                else:
                    frames[n.index] = self._apply_frame(n, lambda i: frames[i])
                    for i, length in n.lines:  # distinct tensors: exporters name each leaf
                        lines[self._line_slot[(n.index, i)]] = tuple(
                            torch.zeros_like(frames[i]) for _ in range(length))
        return {"co": tuple(states), "lines": tuple(lines)}, tuple(frames[self._output].shape[1:])

    # ------------------------------------------------------------------ evaluation helpers
    def _static(self, n: Node) -> Any:
        return n.fn(self)

    def _apply_frame(self, n: Node, value: Callable[[int], Any]) -> Any:
        """Apply an ``fn`` node to frames: directly, or on clips of one frame."""
        if n.fast:
            return n.fn(*_map(n.args, value), **_map(n.kwargs, value))
        nodes = self._nodes

        def as_clip(i: int) -> Any:
            v = value(i)
            if v is None:  # a size or other value without time, computed at an earlier step
                return self._meta.get(i)
            return _with_axis(v, nodes[i].time_axis, True)

        y = n.fn(*_map(n.args, as_clip), **_map(n.kwargs, as_clip))
        y = _with_axis(y, n.time_axis, False)
        if n.time_axis is None and not n.virtual:
            self._meta[n.index] = y
        return y

    def _apply_chunk(self, n: Node, value: Callable[[int], Any]) -> Any:
        """Apply an ``fn`` node to chunks (time kept) or, after a window, frame by frame."""
        if not n.virtual:
            return n.fn(*_map(n.args, value), **_map(n.kwargs, value))
        streams = [i for i in n.streams if self._nodes[i].virtual]
        length = len(value(streams[0]))
        outs = []
        for k in range(length):
            def pick(i: int, k: int = k) -> Any:
                v = value(i)
                return v[k] if self._nodes[i].virtual else v
            outs.append(self._apply_frame(n, pick))
        return outs

    def _ages(self, age: Age, phase: int) -> int:
        """An input step index to count emissions from: the age, or one past every warm-up."""
        if isinstance(age, int):
            return age
        s = self._geom.stride
        return phase % s + s * (self._horizon // s + 1)

    # ------------------------------------------------------------------ one step
    def _step(self, x: Any, state: dict, age: Age, phase: int):
        vals: list[Any] = [None] * len(self._nodes)
        times: list[Any] = [None] * len(self._nodes)
        co_states = list(state["co"])
        lines = list(state["lines"])
        for op, i, a, b, c in self._plan:
            if op == 0:  # co: a = source, b = (slot, step), c = keep_axis
                v = vals[a]
                if v is None:
                    continue
                slot, step = b
                ta, tp = times[a]
                y, co_states[slot], ya, yp = step(v, co_states[slot], ta, tp)
                if y is not None:
                    vals[i] = y if c is None else y.unsqueeze(c)
                    times[i] = (ya, yp)
            elif op == 1:  # fn: a = first stream, b = streams, c = call(vals)
                if vals[a] is None or (b and any(vals[j] is None for j in b)):
                    continue
                vals[i] = c(vals)
                times[i] = times[a]
            elif op == 2:  # input
                vals[i] = x.view(x.shape[0]) if self._flat and x.dim() == 2 else x
                times[i] = (age, phase)
            elif op == 3:  # static
                vals[i] = c(self)
            elif op == 4:  # crop: the identity online
                vals[i] = vals[a]
                times[i] = times[a]
            else:  # join with delay lines: c = (entries, call, steady-state table)
                entries, call, table = c
                if isinstance(age, int):
                    due, picks = self._join_picks(i, entries, age)
                else:
                    due, picks = table[phase % len(table)]
                args = list(vals) if due else None
                for (j, length, slot, _), pick in zip(entries, picks):
                    q = lines[slot] if vals[j] is None else (*lines[slot], vals[j])
                    if due:
                        args[j] = q[pick]
                    lines[slot] = q[len(q) - length:] if length else ()
                if not due:
                    continue
                g = self._nodes[i].geometry
                out_age, out_phase = advance(age, phase, g.delay, g.stride)
                if isinstance(out_age, int) and out_age < 0:
                    continue
                vals[i] = call(args)
                times[i] = (out_age, out_phase)
        y = vals[self._output]
        new = {"co": tuple(co_states), "lines": tuple(lines)}
        if y is None:
            return None, new, None, 0
        return y, new, *times[self._output]

    # ------------------------------------------------------------------ many steps
    def _steps(self, x: Tensor, state: dict, age: Age, phase: int):
        if isinstance(age, Tensor) or self._virtual:
            return super()._steps(x, state, age, phase)
        t = x.shape[2]
        if self._flat:
            x = x.view(x.shape[0], t)
        elif self.time_dim != 2:
            x = x.movedim(2, self.time_dim)
        return self._run_chunks(x, t, state, age, phase, flush=False)

    def _flush(self, state: dict, age: Age, phase: int):
        return self._run_chunks(None, 0, state, age, phase, flush=True)

    def _run_chunks(self, x: Tensor | None, t: int, state: dict, age: Age, phase: int,
                    flush: bool):
        """Chunks through every node (``flush``: the end padding after the last frame)."""
        nodes = self._nodes
        vals: list[Any] = [None] * len(nodes)
        co_states = list(state["co"])
        lines = list(state["lines"])
        a0 = self._ages(age, phase)
        for n in nodes:
            kind = n.kind
            if kind == "input":
                vals[n.index] = x
            elif kind == "static":
                vals[n.index] = self._static(n)
            elif kind == "co":
                vals[n.index] = self._co_chunk(n, vals[n.source], co_states, age, phase, t,
                                               flush)
            elif kind == "crop":
                v = vals[n.source]
                if v is not None:
                    ta, crop = n.time_axis, n.fn
                    length = v.shape[ta] - (crop if flush else 0)
                    v = v.narrow(ta, 0, length) if length > 0 else None
                vals[n.index] = v
            elif not n.lines:
                if any(vals[i] is None or _length(vals[i], nodes[i]) == 0 for i in n.streams):
                    continue
                vals[n.index] = self._apply_chunk(n, vals.__getitem__)
            else:
                vals[n.index] = self._join_chunk(n, vals, lines, a0, t, flush)
        y = vals[self._output]
        new = {"co": tuple(co_states), "lines": tuple(lines)}
        out = nodes[self._output]
        if y is None or _length(y, out) == 0:
            return None, new, None, 0
        if out.virtual:
            y = torch.stack(y, 2)
        elif out.time_axis != 2:
            y = y.movedim(out.time_axis, 2)
        return y, new, *_next_index(age, phase, self._geom)

    def _co_chunk(self, n: Node, v: Any, co_states: list, age: Age, phase: int, t: int,
                  flush: bool) -> Any:
        key = self._co_slot[n.index]
        src = self._nodes[n.source]
        a, p = (age, phase) if src.kind == "input" else _next_index(age, phase, src.geometry)
        parts = []
        fed = _length(v, src) if v is not None else 0
        if fed:
            chunk = torch.stack(v, 2) if src.virtual else (
                v.movedim(src.time_axis, 2) if src.time_axis != 2 else v)
            y, co_states[key], _, _ = n.co._steps(chunk, co_states[key], a, p)
            if y is not None:
                parts.append(y)
        if flush:
            a, p = shift(a, p, fed)
            y, co_states[key], _, _ = n.co._flush(co_states[key], a, p)
            if y is not None:
                parts.append(y)
        if not parts:
            return None
        y = torch.cat(parts, 2) if len(parts) > 1 else parts[0]
        if n.virtual:
            frames = list(y.unbind(2))
            return [f.unsqueeze(n.keep_axis) for f in frames] if n.keep_axis is not None \
                else frames
        return y.movedim(2, n.time_axis) if n.time_axis != 2 else y

    def _join_chunk(self, n: Node, vals: list, lines: list, a0: int, t: int,
                    flush: bool) -> Any:
        nodes = self._nodes
        g = n.geometry
        seqs: dict[int, list] = {}
        lags: dict[int, int] = {}
        for i, length in n.lines:
            key = self._line_slot[(n.index, i)]
            v = vals[i]
            frames = list(lines[key])
            if v is not None:
                frames += list(v) if nodes[i].virtual else list(v.unbind(nodes[i].time_axis))
            seqs[i] = frames
            lags[i] = count(nodes[i].geometry, a0) - count(g, a0)
            lines[key] = tuple(frames[len(frames) - length:]) if length else ()
        done = count(g, a0)
        if flush:
            m = min(count(nodes[i].geometry, a0) + len(seqs[i]) - length
                    for i, length in n.lines) - done
        else:
            m = count(g, a0 + t) - done
        outs = []
        for k in range(max(m, 0)):
            picked = {i: seqs[i][length - lags[i] + k] for i, length in n.lines}
            outs.append(self._apply_frame(n, lambda i, p=picked: p[i] if i in p else vals[i]))
        if not outs:
            return None
        if n.virtual:
            return outs
        return torch.stack(outs, n.time_axis)

    # ------------------------------------------------------------------ offline
    def _clip(self, x: Any) -> Any:
        if self._virtual:
            return self._windows(x)
        with call_mode("forward"):  # leaves through __call__, so their hooks run
            return fx.Interpreter(self, graph=self._offline).run(x)

    def _windows(self, x: Tensor) -> Tensor | None:
        """Offline result of a window classifier (a reduction over time): its prediction for
        every window of the clip, stacked on dim 2, as the stream gives them (for a clip of
        exactly the window's length: the source model's output, with a time axis of 1)."""
        if not isinstance(x, Tensor) or x.dim() <= self.time_dim:
            raise ValueError(f"{type(self).__name__} expects a clip with time at dim "
                             f"{self.time_dim}, got {x if not isinstance(x, Tensor) else x.shape}")
        clip = x.unsqueeze(1) if self._flat else x.movedim(self.time_dim, 2)
        t = clip.shape[2]
        state = self.init_state(clip.shape[0], tuple(clip.select(2, 0).shape[1:]),
                                device=clip.device, dtype=clip.dtype)["tree"]
        y, state, _, _ = self._steps(clip, state, 0, 0)
        z, _, _, _ = self._flush(state, t, t % self._geom.stride)
        parts = [p for p in (y, z) if p is not None]
        return torch.cat(parts, 2) if len(parts) > 1 else (parts[0] if parts else None)

    # ------------------------------------------------------------------ layouts
    def forward_step(self, x: Any) -> Any:
        """As :meth:`CoModule.forward_step`; clips ``(B, T)`` step as frames ``(B,)``."""
        if self._flat and isinstance(x, Tensor) and x.dim() == 1:
            x = x.unsqueeze(1)
        return super().forward_step(x)

    def forward_steps(self, x: Tensor, pad_end: bool = False) -> Tensor | None:
        """As :meth:`CoModule.forward_steps`, with clips in the source model's layout.

        The input's time axis is ``time_dim``; outputs come back with time where the source
        model's output has it (dim 2 after a reduction over a window).
        """
        if self._flat and isinstance(x, Tensor) and x.dim() == 2:
            x = x.unsqueeze(1)
        elif self.time_dim != 2 and isinstance(x, Tensor):
            if x.dim() <= self.time_dim:
                raise ValueError(f"forward_steps expects clips with time at dim {self.time_dim}, "
                                 f"got shape {tuple(x.shape)}")
            x = x.movedim(self.time_dim, 2)
        y = super().forward_steps(x, pad_end)
        out = self._nodes[self._output]
        if isinstance(y, Tensor) and not out.virtual and out.time_axis != 2:
            y = y.movedim(2, out.time_axis)
        return y


def _next_index(age: Age, phase: int, g: Temporal) -> tuple[Age, int]:
    """``(age, phase)`` of the next output of a node of cumulative geometry ``g``, when the
    graph's next input frame has ``(age, phase)`` (outputs of negative index never exist)."""
    if isinstance(age, int):
        c = count(g, age)
        return c, c
    return next_out(age, phase, g)


def _length(v: Any, n: Node) -> int:
    if n.virtual:
        return len(v)
    if isinstance(n.time_axis, tuple):
        return next(e.shape[a] for e, a in zip(v, n.time_axis) if a is not None)
    if n.time_axis is None or not isinstance(v, Tensor):
        return 1
    return v.shape[n.time_axis]


def _with_axis(v: Any, axis: Any, insert: bool) -> Any:
    """Insert (or remove) the length-1 time axis of a frame (or of each tensor of a tuple)."""
    if axis is None:
        return v
    if isinstance(axis, tuple):
        if isinstance(v, (tuple, list)):
            return tuple(_with_axis(e, a, insert) for e, a in zip(v, axis))
        return v
    if not isinstance(v, Tensor):
        return v
    return v.unsqueeze(axis) if insert else v.squeeze(axis)


def mirror(source: nn.Module, leaves: dict[str, nn.Module], root: nn.Module) -> None:
    """Register on ``root`` a module tree with ``source``'s names: ``leaves`` (by path) replace
    source modules; other modules become plain containers holding the source's own parameters
    and buffers (the same tensors), so ``state_dict`` keys are the source's."""

    def build(mod: nn.Module, prefix: str, target: nn.Module) -> None:
        for name, p in mod._parameters.items():
            target.register_parameter(name, p)
        for name, b in mod._buffers.items():
            target.register_buffer(name, b, persistent=name not in
                                   mod._non_persistent_buffers_set)
        for name, child in mod._modules.items():
            if child is None:
                continue
            path = f"{prefix}{name}"
            if path in leaves:
                target.add_module(name, leaves[path])
                continue
            if not _has_leaf_below(path, leaves):
                target.add_module(name, child)  # untouched: the source module itself
                continue
            shell = nn.Module()
            shell.train(child.training)
            target.add_module(name, shell)
            build(child, path + ".", shell)

    build(source, "", root)


def _has_leaf_below(path: str, leaves: dict[str, nn.Module]) -> bool:
    pre = path + "."
    return any(k.startswith(pre) for k in leaves)
