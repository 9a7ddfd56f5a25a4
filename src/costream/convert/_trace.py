"""Graph conversion: trace a model's ``forward`` with ``torch.fx`` and build a continual
:class:`~costream.modules._graph.Graph` from it.

Steps:

1. trace, with leaves: modules that have a handler, point-wise modules, continual modules,
   weight-normed / parametrized layers and ``torch.nn``'s own layers;
2. run the traced graph on two example clips of different lengths: the axis whose size changes
   is each value's time axis;
3. classify each node: a continual operation (convolutions, pools, time crops and padding,
   reductions over a window), an operation that acts on each time step on its own (checked on
   the example: the op on one frame equals that frame of the op on the clip), or a blocker;
4. derive each node's cumulative geometry from the graph input, align joins, and build the
   :class:`Graph` whose module tree mirrors the source (same ``state_dict`` keys).
"""

from __future__ import annotations

import operator
import os
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from ..core._module import CoModule
from ..core._temporal import Temporal
from ..modules._conv import _CoConvNd as _CoConv
from ..modules._delay import Skip
from ..modules._graph import Graph, Node, Ref, _map, mirror
from ..modules._pointwise import is_pointwise, pointwise_step
from ..modules._pool import _WindowPool as _CoPool
from ..modules._window import Pad, WindowReduce, fuse_pad
from . import _leaves
from ._report import Blocker, NotStreamableError

_NORM_OVER_TIME = (nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d,
                   nn.LocalResponseNorm)
_ATTENTION = (nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerEncoder,
              nn.TransformerDecoderLayer, nn.TransformerDecoder, nn.Transformer)
_RECURRENT = (nn.RNN, nn.LSTM, nn.GRU, nn.RNNCell, nn.LSTMCell, nn.GRUCell)
_ADAPTIVE = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
             nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
_REDUCTIONS = {"mean": "mean", "sum": "sum", "amax": "amax", "amin": "amin", "nanmean": None}
_PRODUCTS = {"matmul", "bmm", "einsum", "baddbmm", "scaled_dot_product_attention", "softmax",
             "log_softmax", "mm"}
_FAST_FUNCTIONS = {operator.add, operator.mul, operator.sub, operator.truediv, torch.add,
                   torch.mul, torch.sub, torch.relu, torch.tanh, torch.sigmoid, F.relu,
                   torch.sin, torch.exp, F.gelu, F.silu, F.elu, F.leaky_relu, torch.neg,
                   operator.neg}
_FAST_METHODS = {"relu", "tanh", "sigmoid", "add", "mul", "sub", "neg", "exp", "contiguous"}


class _Tracer(fx.Tracer):
    def __init__(self, handlers: dict, record: bool = True) -> None:
        super().__init__()
        self.record_stack_traces = record
        self._handlers = handlers

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, CoModule) or is_pointwise(m) or _leaves.is_reparametrized(m):
            return True
        if type(m) in self._handlers and not isinstance(m, nn.Sequential):
            return True
        return super().is_leaf_module(m, qualname)


def trace_graph(model: nn.Module, handlers: dict, convert: Callable[[nn.Module, str], nn.Module],
                *, example: Tensor | None, time_dim: int, temporal_window: int | None
                ) -> Graph:
    """Convert ``model`` by tracing; raises :class:`NotStreamableError` listing all blockers."""
    name = type(model).__name__
    tracer = _Tracer(handlers)
    try:
        graph = tracer.trace(model)
    except Exception as err:  # fx cannot trace data-dependent control flow etc.
        msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise NotStreamableError(name, [Blocker("", name, "", f"its forward cannot be traced "
                                                f"with torch.fx ({msg}); register a handler "
                                                f"with costream.register_handler")]) from None
    gm = fx.GraphModule(model, graph)
    builder = _Builder(model, gm, handlers, convert, time_dim, temporal_window)
    return builder.build(example)


class _Builder:
    def __init__(self, model: nn.Module, gm: fx.GraphModule, handlers: dict,
                 convert: Callable, time_dim: int, window: int | None) -> None:
        self.model = model
        self.gm = gm
        self.handlers = handlers
        self.convert = convert
        self.time_dim = time_dim
        self.window = window
        self.modules = dict(model.named_modules())
        self.blockers: list[Blocker] = []
        self.nodes: list[Node] = []
        self.index: dict[fx.Node, int] = {}
        self.leaves: dict[str, nn.Module] = {}

    # ------------------------------------------------------------------ propagation
    def _example(self, example: Tensor | None) -> Tensor:
        if example is not None:
            if not isinstance(example, Tensor) or example.dim() <= self.time_dim:
                raise ValueError(f"example must be a clip tensor with time at dim "
                                 f"{self.time_dim}, got {_describe(example)}")
            return example.detach()
        first = next((m for n in self.gm.graph.nodes if n.op == "call_module"
                      for m in [self.modules.get(n.target)] if hasattr(m, "in_channels")),
                     None)
        if first is None or self.time_dim != 2:
            raise ValueError("cannot guess an input shape for this model: pass example=clip "
                             "(a tensor shaped like the model's input)")
        nd = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}
        dims = next((v for k, v in nd.items() if isinstance(first, k)), 1)
        ref = next(first.parameters(), None)
        dtype = ref.dtype if ref is not None else torch.get_default_dtype()
        return torch.randn(2, first.in_channels, 24, *([32] * (dims - 1)), dtype=dtype)

    def _run(self, x: Tensor) -> dict[fx.Node, Any]:
        values: dict[fx.Node, Any] = {}

        class Recorder(fx.Interpreter):
            def run_node(self, n: fx.Node) -> Any:
                v = super().run_node(n)
                values[n] = v
                return v

        modes = [(m, m.training) for m in self.model.modules()]
        self.model.eval()  # no batch statistics updated, no dropout noise in the checks
        try:
            with torch.no_grad():
                Recorder(self.gm).run(x)
        finally:
            for m, mode in modes:
                m.training = mode
        return values

    # ------------------------------------------------------------------ build
    def build(self, example: Tensor | None) -> Graph:
        x1 = self._example(example)
        x2 = torch.cat([x1, x1], self.time_dim)  # every strided length differs too
        try:
            v1, v2 = self._run(x1), self._run(x2)
        except Exception as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ValueError(f"running {type(self.model).__name__} on the example clip "
                             f"{tuple(x1.shape)} failed: {first}") from None
        self.v1, self.v2 = v1, v2
        output = None
        for fxn in self.gm.graph.nodes:
            if fxn.op == "output":
                output = fxn.args[0]
                continue
            try:
                self._node(fxn)
            except _Block as blk:
                self.blockers.append(self._blocker(fxn, str(blk)))
                # a placeholder stream, so later nodes resolve and are checked by type
                self._add(fxn, "blocked", fn=_never)
        if not isinstance(output, fx.Node):
            self.blockers.append(Blocker("", type(self.model).__name__, "",
                                         "the model must return one tensor"))
        if self.blockers:
            raise NotStreamableError(type(self.model).__name__, self.blockers)
        out = self.nodes[self.index[output]]
        if not self._is_stream(out):
            raise NotStreamableError(type(self.model).__name__, [Blocker(
                "", type(self.model).__name__, "", "its output does not depend on the input")])
        keep = self._live(out.index)
        nodes = self._renumber(keep)
        frame = [s for d, s in enumerate(x1.shape) if d != self.time_dim]
        offline = self.gm.graph  # the builder's own copy of the trace
        offline.eliminate_dead_code()  # outputs nothing reads are not computed offline either
        graph = Graph(nodes, out.index, offline, time_dim=self.time_dim,
                      input_spec=(len(frame), frame[1] if len(frame) > 1 else None))
        mirror(self.model, self.leaves, graph)
        graph.training = self.model.training  # submodules keep their own (shared) modes
        return graph

    def _live(self, out: int) -> set[int]:
        keep, todo = set(), [out]
        while todo:
            i = todo.pop()
            if i in keep:
                continue
            keep.add(i)
            n = self.nodes[i]
            todo += [n.source] if n.source >= 0 else []
            todo += n.streams
            refs: list[int] = []
            _map((n.args, n.kwargs), refs.append)
            todo += refs
        return keep

    def _renumber(self, keep: set[int]) -> list[Node]:
        order = sorted(keep)
        new = {old: i for i, old in enumerate(order)}
        nodes = []
        for old in order:
            n = self.nodes[old]
            n.index = new[old]
            n.source = new[n.source] if n.source >= 0 else -1
            n.streams = [new[i] for i in n.streams]
            n.lines = [(new[i], length) for i, length in n.lines]
            n.args = _map(n.args, lambda i: Ref(new[i]))
            n.kwargs = _map(n.kwargs, lambda i: Ref(new[i]))
            nodes.append(n)
        return nodes

    def _add(self, fxn: fx.Node, kind: str, **attrs: Any) -> Node:
        n = Node(len(self.nodes), fxn.name, kind)
        for k, v in attrs.items():
            setattr(n, k, v)
        n.where = self._path(fxn)
        self.nodes.append(n)
        self.index[fxn] = n.index
        return n

    def _is_stream(self, n: Node) -> bool:
        return n.kind not in ("static",)

    # ------------------------------------------------------------------ time axes
    def _axis(self, fxn: fx.Node) -> int | str | None:
        """The time axis of ``fxn``'s value; None: none; "merged": time mixed into others."""
        a, b = self.v1.get(fxn), self.v2.get(fxn)
        if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)) and len(a) == len(b) \
                and a and all(isinstance(v, Tensor) for v in (*a, *b)):
            axes = tuple(_tensor_axis(u, v) for u, v in zip(a, b))
            return "merged" if "merged" in axes else axes
        if isinstance(a, Tensor) and isinstance(b, Tensor):
            if a.dim() != b.dim():
                return "merged"
            diff = [d for d in range(a.dim()) if a.shape[d] != b.shape[d]]
            if not diff:
                return None
            return diff[0] if len(diff) == 1 else "merged"
        return None

    # ------------------------------------------------------------------ nodes
    def _node(self, fxn: fx.Node) -> None:
        if fxn.op == "placeholder":
            if any(n.kind == "input" for n in self.nodes):
                if fxn.args:  # a defaulted argument: a constant
                    self._add(fxn, "static", fn=_const(fxn.args[0]))
                    return
                raise _Block("models with several stream inputs are not supported")
            self._add(fxn, "input", time_axis=self.time_dim)
            return
        if fxn.op == "get_attr":
            path = fxn.target
            self._add(fxn, "static", fn=_attr(path))
            return
        ins = [self.nodes[self.index[a]] for a in fxn.all_input_nodes]
        streams = [n for n in ins if self._is_stream(n)]
        if not streams:
            self._static(fxn)
            return
        if any(n.kind == "blocked" for n in streams):  # after a blocker: checks by type only
            self._by_type(fxn)
            self._add(fxn, "blocked", fn=_never)
            return
        if fxn.op == "call_module":
            self._module(fxn, streams)
        elif fxn.op in ("call_function", "call_method"):
            self._function(fxn, streams)
        else:
            raise _Block(f"unsupported graph operation {fxn.op}")

    def _by_type(self, fxn: fx.Node) -> None:
        """Refusals that need no time axis (the op's input already cannot stream)."""
        if fxn.op == "call_module":
            m = self.gm.get_submodule(fxn.target)
            if isinstance(m, _NORM_OVER_TIME):
                raise _Block("normalises over time (statistics of the whole clip)")
            if isinstance(m, _ATTENTION):
                raise _Block("attends over the whole clip")
            if isinstance(m, _RECURRENT):
                raise _Block("recurrent layers are converted directly, not inside a graph")
            return
        t = fxn.target
        name = t if isinstance(t, str) else getattr(t, "__name__", "")
        if name in _PRODUCTS:
            raise _Block("attends or multiplies over the whole clip (mixes time steps)")

    def _static(self, fxn: fx.Node) -> None:
        args, kwargs = self._refs(fxn)
        nodes = self.nodes
        fn = self._callable(fxn)

        def value(root: nn.Module) -> Any:
            def get(i: int) -> Any:
                return nodes[i].fn(root)

            return fn(*_map(args, get), **_map(kwargs, get))

        self._add(fxn, "static", fn=value)

    def _refs(self, fxn: fx.Node) -> tuple[tuple, dict]:
        idx = self.index
        # fx's immutable containers become plain ones (the Ref -> Ref map rebuilds them)
        args = _map(fx.node.map_arg(fxn.args, lambda a: Ref(idx[a])), Ref)
        kwargs = _map(fx.node.map_arg(fxn.kwargs, lambda a: Ref(idx[a])), Ref)
        return args, kwargs

    def _callable(self, fxn: fx.Node) -> Callable[..., Any]:
        if fxn.op == "call_module":
            return self.gm.get_submodule(fxn.target)
        if fxn.op == "call_method":
            name = fxn.target
            return lambda obj, *a, **k: getattr(obj, name)(*a, **k)
        return fxn.target

    def _op_name(self, fxn: fx.Node) -> str:
        if fxn.op == "call_module":
            return type(self.modules.get(fxn.target, self.gm.get_submodule(fxn.target))).__name__
        if fxn.op == "call_method":
            return f"Tensor.{fxn.target}"
        t = fxn.target
        mod = getattr(t, "__module__", "") or ""
        short = {"torch.nn.functional": "F", "_operator": "operator"}.get(mod, mod)
        return f"{short}.{getattr(t, '__name__', str(t))}" if short else str(t)

    # ------------------------------------------------------------------ modules
    def _module(self, fxn: fx.Node, streams: list[Node]) -> None:
        m = self.gm.get_submodule(fxn.target)
        src = streams[0]
        ta = src.time_axis
        if isinstance(m, _NORM_OVER_TIME):
            raise _Block("normalises over time (statistics of the whole clip)")
        if isinstance(m, nn.LayerNorm):
            dims = range(self.v1[fxn.all_input_nodes[0]].dim() - len(m.normalized_shape),
                         self.v1[fxn.all_input_nodes[0]].dim())
            if ta in dims:
                raise _Block("normalises over time (its normalized_shape covers the time axis)")
        if isinstance(m, _ATTENTION):
            raise _Block("attends over the whole clip (convert it with continual(..., "
                         "temporal_window=n) on its own, or register a handler)")
        if isinstance(m, _RECURRENT):
            raise _Block("recurrent layers are converted directly (continual(rnn)), not "
                         "inside a traced graph")
        if isinstance(m, nn.modules.padding._ConstantPadNd) and len(streams) == 1 and \
                isinstance(ta, int) and self._pad(fxn, src, m.padding, "constant", m.value):
            return
        if isinstance(m, _ADAPTIVE):
            self._adaptive(fxn, m, src, lambda w: self.convert(m, fxn.target, w))
            return
        temporal = isinstance(m, CoModule) or _leaves.is_reparametrized(m) or (
            type(m) in self.handlers and not isinstance(m, nn.Linear))
        if temporal and len(streams) > 1:
            raise _Block("a temporal layer needs one stream input")
        if temporal and src.virtual:
            t = getattr(m, "temporal", None) if isinstance(m, CoModule) else None
            k = getattr(m, "kernel_size", (None,))
            if t == Temporal() or (t is None and k[0] == 1 and getattr(m, "stride", (1,))[0] == 1
                                   and not _leaves.is_reparametrized(m)
                                   and getattr(m, "padding", (0,))[0] == 0):
                self._checked_fn(fxn, streams, "mixes time steps")  # acts on one frame
                return
            raise _Block("a temporal layer after a reduction over the window")
        co = None
        if isinstance(m, CoModule):
            co = m
        elif _leaves.is_reparametrized(m):
            co = _leaves.convert_reparametrized(m)
            if co is None:
                raise _Block("a parametrized layer that is not a convolution")
        elif type(m) in self.handlers and not isinstance(m, nn.Linear):
            if isinstance(ta, int) and ta > 2 and isinstance(m, _leaves._TORCH_CONV):
                # time is a later spatial axis: a continual conv over the permuted kernel;
                # the source conv stays in the module tree (offline and state_dict)
                self._co(fxn, _leaves.time_last_conv(m, ta - 2), src)
                return
            co = self.convert(m, fxn.target, None)
        if co is not None:
            self._co(fxn, co, src, register=fxn.target)
            return
        if is_pointwise(m) and isinstance(ta, int) and ta >= 2 and len(streams) == 1:
            step = pointwise_step(m)
            self._fn(fxn, streams, fast=True, fn=m, frame_fn=step)
            return
        self._checked_fn(fxn, streams, f"{type(m).__name__} mixes time steps and has no handler "
                         f"(register one with costream.register_handler)")

    def _co(self, fxn: fx.Node, co: nn.Module, src: Node, register: str | None = None,
            keep_axis: int | None = None, virtual: bool = False) -> Node:
        if not isinstance(co, CoModule):  # a handler may return a point-wise module
            self._fn(fxn, [src], fast=False, fn=co)
            if register:
                self.leaves[register] = co
            return self.nodes[-1]
        if src.virtual:
            raise _Block("a temporal layer after a reduction over the window")
        if src.time_axis != 2 and isinstance(co, (_CoConv, _CoPool)) and not getattr(
                co, "_time_dim", 0):
            raise _Block(f"temporal layers need time at dim 2 of their input (their first "
                         f"spatial dim); here it is dim {src.time_axis}")
        if not isinstance(src.time_axis, int) or (src.time_axis < 2 and not isinstance(
                co, (Skip, Pad, WindowReduce))):
            raise _Block(f"a temporal layer over dim {src.time_axis} (time must not be the "
                         f"channel axis)")
        out_axis = None if virtual else self._axis(fxn)
        if out_axis == "merged":
            raise _Block("moves time into channels or batch")
        if register:
            self.leaves[register] = co
        fuse = None
        if src.kind == "co" and isinstance(src.co, Pad) and _fusible(co, src.co):
            fuse = (co, src.co.start, src.co.end)
            co, src = fuse_pad(*fuse), self.nodes[src.source]
        g = src.geometry.then(co.temporal)
        return self._add(fxn, "co", co=co, source=src.index, time_axis=out_axis,
                         keep_axis=keep_axis, virtual=virtual, geometry=g, fuse=fuse)

    def _adaptive(self, fxn: fx.Node, m: Any, src: Node, make: Callable[[int], nn.Module]
                  ) -> None:
        out_axis = self._axis(fxn)
        if out_axis == 2 and self.v1[fxn].shape[2] == self.v1[fxn.all_input_nodes[0]].shape[2]:
            self._checked_fn(fxn, [src], "adaptive pooling that resizes time")
            return
        if out_axis is not None:
            raise _Block("adaptive pooling that resizes time cannot stream")
        if self.v1[fxn].dim() <= 2 or self.v1[fxn].shape[2] != 1:
            raise _Block("adaptive pooling that moves time")
        self._co(fxn, make(self._window_at(src)), src, keep_axis=2, virtual=True,
                 register=fxn.target if fxn.op == "call_module" else None)

    # ------------------------------------------------------------------ functions
    def _function(self, fxn: fx.Node, streams: list[Node]) -> None:
        t = fxn.target
        src = streams[0]
        name = t if isinstance(t, str) else getattr(t, "__name__", "")
        if fxn.op == "call_function" and t in _leaves._F_CONV:
            args, kwargs = self._static_args(fxn)
            if fxn.args[0] is not fxn.all_input_nodes[0] or len(streams) > 1:
                raise _Block("a convolution whose weight depends on the input")
            try:
                co = _leaves.functional_conv(t, args, kwargs)
            except ValueError as err:
                raise _Block(str(err)) from None
            self._co(fxn, co, src)
            return
        if fxn.op == "call_function" and t in _leaves._F_POOL and len(streams) == 1:
            args, kwargs = self._static_args(fxn)
            self._co(fxn, _leaves.functional_pool(t, args, kwargs), src)
            return
        if fxn.op == "call_function" and t in _leaves._F_ADAPTIVE and len(streams) == 1:
            args, kwargs = self._static_args(fxn)
            self._adaptive(fxn, None, src,
                           lambda w: _leaves.functional_adaptive(t, args, kwargs, w))
            return
        if t is operator.getitem and len(streams) == 1 and isinstance(src.time_axis, int):
            if self._slice(fxn, src):
                return
        if t is operator.getitem and isinstance(src.time_axis, tuple) and \
                isinstance(fxn.args[1], int):  # one tensor of a tuple (chunk, split, ...)
            self._fn(fxn, streams, fast=True, time_axis=src.time_axis[fxn.args[1]])
            return
        if (t is F.pad or name == "pad") and len(streams) == 1 and isinstance(src.time_axis,
                                                                               int):
            args, kwargs = self._static_args(fxn)
            pads = args[1] if len(args) > 1 else kwargs.get("pad")
            mode = args[2] if len(args) > 2 else kwargs.get("mode", "constant")
            value = args[3] if len(args) > 3 else kwargs.get("value", 0.0)
            if self._pad(fxn, src, pads, mode, value):
                return
        if name in _REDUCTIONS and len(streams) == 1 and isinstance(src.time_axis, int):
            if self._reduce(fxn, src, name):
                return
        fast = (fxn.op == "call_function" and t in _FAST_FUNCTIONS) or (
            fxn.op == "call_method" and t in _FAST_METHODS)
        fast = fast and self._broadcast_safe(fxn, streams)
        if name in _PRODUCTS:
            reason = "attends or multiplies over the whole clip (mixes time steps)"
        else:
            reason = "mixes time steps"
        self._checked_fn(fxn, streams, reason, fast=fast, product=name in _PRODUCTS)

    def _static_args(self, fxn: fx.Node) -> tuple[tuple, dict]:
        """Arguments with every static node evaluated (streams left as None)."""
        def val(a: fx.Node) -> Any:
            n = self.nodes[self.index[a]]
            return n.fn(self.model) if n.kind == "static" else None

        return (fx.node.map_arg(fxn.args, val), fx.node.map_arg(fxn.kwargs, val))

    def _broadcast_safe(self, fxn: fx.Node, streams: list[Node]) -> bool:
        """Frames can go through as they are: streams of one rank, time at a non-channel dim,
        other tensor arguments scalars."""
        ranks = {self.v1[a].dim() for a in fxn.all_input_nodes
                 if self._is_stream(self.nodes[self.index[a]])}
        if len(ranks) != 1 or any(n.virtual or not isinstance(n.time_axis, int)
                                  or n.time_axis < 2 for n in streams):
            return False
        for a in fxn.all_input_nodes:
            n = self.nodes[self.index[a]]
            if not self._is_stream(n):
                v = self.v1[a]
                if isinstance(v, Tensor) and v.dim() > 0:
                    return False
        out = self.v1[fxn]
        return isinstance(out, Tensor) and out.dim() == ranks.pop()

    def _checked_fn(self, fxn: fx.Node, streams: list[Node], reason: str,
                    fast: bool = False, product: bool = False) -> None:
        """An op that must act on each time step on its own: verified on the example."""
        axis = self._axis(fxn)
        out = self.v1[fxn]
        if axis == "merged":
            raise _Block(reason if product else "moves time into channels or batch")
        virtual = any(n.virtual for n in streams)
        timed = [n for n in streams if not n.virtual and n.time_axis is not None]
        if virtual and timed:
            raise _Block("combines a value pooled over the window with the stream "
                         "(e.g. clip-level squeeze-excitation): it cannot stream")
        if virtual:
            self._fn(fxn, streams, fast=False, virtual=True)
            return
        if not timed:  # stream-derived values without time (sizes): evaluated on each chunk
            if isinstance(out, Tensor) and out.dim() > 0:
                raise _Block("reduces over time (needs temporal_window)")
            self._fn(fxn, streams, fast=False, time_axis=None)
            return
        if axis is None:
            if isinstance(out, Tensor):
                raise _Block(reason if "mixes" not in reason else
                             "reduces over time or moves time into channels or batch")
            self._fn(fxn, streams, fast=False, time_axis=None)
            return
        if not self._pointwise_on_example(fxn, timed, axis):
            raise _Block(reason)
        self._fn(fxn, streams, fast=fast, time_axis=axis)

    def _pointwise_on_example(self, fxn: fx.Node, timed: list[Node], axis: Any) -> bool:
        out = self.v1[fxn]
        length = _narrowed(out, axis, None)
        inputs = {a: self.nodes[self.index[a]] for a in fxn.all_input_nodes}
        for a, n in inputs.items():
            if n in timed and _narrowed(self.v1[a], n.time_axis, None) != length:
                return False
        fn = self._callable(fxn)
        for t in sorted({0, length // 2, length - 1}):
            def pick(a: fx.Node, t: int = t) -> Any:
                n = inputs[a]
                v = self.v1[a]
                if n in timed:
                    return _narrowed(v, n.time_axis, t)
                return v
            try:
                with torch.no_grad():
                    y = fn(*fx.node.map_arg(fxn.args, pick), **fx.node.map_arg(fxn.kwargs, pick))
            except Exception:
                return False
            ref = _narrowed(out, axis, t)
            if isinstance(ref, tuple):
                if not isinstance(y, (tuple, list)) or len(y) != len(ref):
                    return False
                if not all(_close(u, v) for u, v in zip(y, ref)):
                    return False
                continue
            if not _close(y, ref):
                return False
        return True

    def _fn(self, fxn: fx.Node, streams: list[Node], fast: bool, fn: Any = None,
            frame_fn: Any = None, time_axis: Any = "auto", virtual: bool = False) -> Node:
        args, kwargs = self._refs(fxn)
        if time_axis == "auto":
            time_axis = None if virtual else self._axis(fxn)
        call = fn if fn is not None else self._callable(fxn)
        meta = [s for s in streams if s.kind == "fn" and s.time_axis is None and not s.virtual]
        if len(meta) < len(streams):  # sizes and other values without time do not gate
            streams = [s for s in streams if s not in meta]
        n = self._add(fxn, "fn", fn=frame_fn if fast and frame_fn is not None else call,
                      args=args, kwargs=kwargs, streams=[s.index for s in streams],
                      fast=fast, time_axis=time_axis, virtual=virtual)
        if fast and frame_fn is not None:
            n.fast = True
        if not fast and frame_fn is not None:
            n.fn = call
        self._join(n, streams)
        return n

    def _join(self, n: Node, streams: list[Node]) -> None:
        uniq = list({s.index: s for s in streams}.values())
        if not uniq:
            return
        gs = [s.geometry for s in uniq]
        if len({g.stride for g in gs}) > 1:
            raise _Block(f"joins streams of different temporal strides {[g.stride for g in gs]}")
        if len({g.extent for g in gs}) > 1:
            raise _Block("joins streams whose lengths differ (crop or pad one of them)")
        if len(set(gs)) == 1:
            n.geometry = gs[0]
            return
        s = gs[0].stride
        delay = max(g.delay for g in gs)
        pad = max(g.padding for g in gs)
        n.geometry = Temporal(delay + pad + 1, s, pad, gs[0].extent + delay)
        n.lines = [(u.index, -((g.delay - delay) // s)) for u, g in zip(uniq, gs)]

    def _window_at(self, src: Node) -> int:
        """Frames a reduction over time sees when the model runs on ``temporal_window`` input
        frames (the window the model classifies)."""
        if self.window is None:
            raise _Block("reduces over time: pass continual(..., temporal_window=n) to stream "
                         "the model over a sliding window of n input frames")
        n = src.geometry.out_length(self.window)
        if n < 1:
            raise _Block(f"temporal_window={self.window} is shorter than the receptive field "
                         f"of the layers before this reduction ({src.geometry.receptive_field})")
        return n

    # ------------------------------------------------------------------ time ops
    def _slice(self, fxn: fx.Node, src: Node) -> bool:
        """``x[..., k:-n]`` along time: a skip of ``k`` frames and an end crop of ``n``."""
        idx = fxn.args[1]
        idx = idx if isinstance(idx, tuple) else (idx,)
        if any(isinstance(i, fx.Node) or (isinstance(i, slice) and any(
                isinstance(v, fx.Node) for v in (i.start, i.stop, i.step))) for i in idx):
            return False
        ndim = self.v1[fxn.args[0]].dim()
        explicit = [(pos, i) for pos, i in enumerate(idx) if i is not None and i is not Ellipsis]
        hit = next(((pos, i) for (pos, i), dd in zip(explicit, _dims_of(idx, ndim))
                    if dd == src.time_axis), None)
        if hit is None:
            return False
        pos, sl = hit
        if isinstance(sl, int):
            raise _Block("selects one frame of the clip (moves time away)")
        if not isinstance(sl, slice) or sl == slice(None):
            return False
        start, stop, step = sl.start or 0, sl.stop, sl.step or 1
        if step != 1:
            raise _Block("a temporal slice with a step cannot stream (use a strided layer)")
        if start < 0 or (stop is not None and stop >= 0):
            raise _Block("keeps frames counted from the end or a fixed number of frames: "
                         "depends on the clip length")
        cur = src
        if start:
            cur = self._add(fxn, "co", co=Skip(start), source=cur.index,
                            time_axis=src.time_axis,
                            geometry=cur.geometry.then(Skip(start).temporal))
            self.index.pop(fxn)
        if stop is not None:
            n = -stop
            g = cur.geometry
            if n > g.end_padding // g.stride:
                raise _Block(f"drops the last {n} frames, which a stream cannot know are last "
                             f"(only {g.end_padding // g.stride} frames of end padding reach it)")
            cur = self._add(fxn, "crop", fn=n, source=cur.index, time_axis=cur.time_axis,
                            geometry=g.then(Temporal(1, 1, 0, -n)))
            self.index.pop(fxn)
        rest = tuple(slice(None) if p == pos else i for p, i in enumerate(idx))
        if all(i == slice(None) for i in rest):
            self.index[fxn] = cur.index
            return True
        n = self._add(fxn, "fn", fn=operator.getitem, args=(Ref(cur.index), rest),
                      streams=[cur.index], time_axis=self._axis(fxn), geometry=cur.geometry)
        return n is not None

    def _pad(self, fxn: fx.Node, src: Node, pads: list, mode: str, value: Any) -> bool:
        """Constant padding along time (``F.pad`` or a padding module): a :class:`Pad`, and
        the padding of other dims (if any) as an op on each frame."""
        pads = list(pads)
        ndim = self.v1[fxn.args[0]].dim()
        k = ndim - 1 - src.time_axis
        if 2 * k + 1 >= len(pads) or (pads[2 * k] == 0 and pads[2 * k + 1] == 0):
            return False
        start, end = pads[2 * k], pads[2 * k + 1]
        if mode != "constant":
            raise _Block(f"pads time with mode {mode!r} (only constant padding can stream)")
        if start < 0 or end < 0:
            raise _Block("negative padding along time")
        value = 0.0 if value is None else value
        co = Pad(start, end, value)
        cur = self._add(fxn, "co", co=co, source=src.index, time_axis=src.time_axis,
                        geometry=src.geometry.then(co.temporal))
        pads[2 * k] = pads[2 * k + 1] = 0
        if any(pads):
            self.index.pop(fxn)
            self._add(fxn, "fn", fn=F.pad, args=(Ref(cur.index), tuple(pads), "constant", value),
                      kwargs={}, streams=[cur.index], time_axis=src.time_axis,
                      geometry=cur.geometry)
        return True

    def _reduce(self, fxn: fx.Node, src: Node, name: str) -> bool:
        """A reduction over time (and other dims): needs ``temporal_window``."""
        args, kwargs = self._static_args(fxn)
        dim = args[1] if len(args) > 1 else kwargs.get("dim")
        keepdim = bool(args[2] if len(args) > 2 else kwargs.get("keepdim", False))
        ndim = self.v1[fxn.args[0]].dim()
        if dim is None:
            raise _Block("reduces over every dimension, batch and time included")
        dims = {d % ndim for d in (dim if isinstance(dim, (tuple, list)) else (dim,))}
        ta = src.time_axis
        if ta not in dims:
            return False
        if 0 in dims:
            raise _Block("reduces over the batch")
        if _REDUCTIONS[name] is None:
            raise _Block(f"{name} over time cannot stream")
        window = self._window_at(src)
        cur = src
        others = tuple(sorted(dims - {ta}))
        op = _REDUCTIONS[name]
        if others:
            red = getattr(torch, op)
            cur = self._add(fxn, "fn", fn=red, args=(Ref(cur.index), others),
                            kwargs={"keepdim": True}, streams=[cur.index], time_axis=ta,
                            geometry=cur.geometry)
            self.index.pop(fxn)
        co = WindowReduce(window, op)
        keep = ta if keepdim else None
        node = self._add(fxn, "co", co=co, source=cur.index, time_axis=None, keep_axis=keep,
                         virtual=True, geometry=cur.geometry.then(co.temporal))
        if others and not keepdim:  # drop the kept singleton dims of the other reductions
            self.index.pop(fxn)
            self._add(fxn, "fn", fn=_squeeze_dims, args=(Ref(node.index), others, ta),
                      streams=[node.index], virtual=True, geometry=node.geometry,
                      time_axis=None)
        return True

    # ------------------------------------------------------------------ messages
    def _path(self, fxn: fx.Node) -> str:
        if fxn.op == "call_module":
            return str(fxn.target)
        stack = fxn.meta.get("nn_module_stack")
        if stack:
            last = list(stack.values())[-1]
            path = last[0] if isinstance(last, tuple) else str(last)
            return path
        return ""

    def _blocker(self, fxn: fx.Node, reason: str) -> Blocker:
        line = ""
        trace = fxn.stack_trace or fxn.meta.get("stack_trace") or ""
        for ln in trace.strip().splitlines():
            ln = ln.strip()
            if ln.startswith("File "):
                parts = ln.split(",")
                file = parts[0][5:].strip().strip('"')
                if len(parts) >= 2 and not any(file.startswith(d) for d in _LIBRARY_DIRS):
                    line = f"{file}:{parts[1].strip()[5:]}"
        return Blocker(self._path(fxn), self._op_name(fxn), line, reason)


_LIBRARY_DIRS = tuple(os.path.dirname(m.__file__) + os.sep for m in (torch, fx))
_LIBRARY_DIRS += (os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep,)


class _Block(Exception):
    """Internal: this node cannot stream (the message is the reason)."""


def _narrowed(v: Any, axis: Any, t: int | None) -> Any:
    """Frame ``t`` (kept as a length-1 axis) of a value, or its length with ``t=None``."""
    if isinstance(axis, tuple):
        if t is None:
            return next(e.shape[a] for e, a in zip(v, axis) if a is not None)
        return tuple(e.narrow(a, t, 1) if a is not None else e for e, a in zip(v, axis))
    return v.shape[axis] if t is None else v.narrow(axis, t, 1)


def _close(y: Any, ref: Tensor) -> bool:
    if not isinstance(y, Tensor) or y.shape != ref.shape:
        return False
    if y.is_floating_point():
        tol = 1e-10 if y.dtype == torch.float64 else 1e-4
        scale = float(ref.abs().max()) if ref.numel() else 1.0
        scale = 1.0 if scale != scale else max(1.0, scale)  # NaN-safe
        return torch.allclose(y, ref, rtol=tol, atol=tol * scale, equal_nan=True)
    return torch.equal(y, ref)


def _tensor_axis(a: Tensor, b: Tensor) -> int | str | None:
    if a.dim() != b.dim():
        return "merged"
    diff = [d for d in range(a.dim()) if a.shape[d] != b.shape[d]]
    if not diff:
        return None
    return diff[0] if len(diff) == 1 else "merged"


def _dims_of(idx: tuple, ndim: int) -> list[int]:
    """The input dim of each explicit (non-None, non-Ellipsis) index entry."""
    nexpl = sum(1 for i in idx if i is not None and i is not Ellipsis)
    out, d = [], 0
    for i in idx:
        if i is Ellipsis:
            d += ndim - nexpl
        elif i is None:
            continue
        else:
            out.append(d)
            d += 1
    return out


def _fusible(conv: nn.Module, pad: Pad) -> bool:
    return (isinstance(conv, _CoConv) and conv.padding_mode == "zeros" and pad.value == 0.0
            and conv._tpad[0] + pad.start <= conv._span)


def _squeeze_dims(x: Tensor, dims: tuple[int, ...], time: int) -> Tensor:
    # the window reduction removed time; the other reduced dims were kept as size 1
    shifted = [d - 1 if d > time else d for d in dims]
    for d in sorted(shifted, reverse=True):
        x = x.squeeze(d)
    return x


def _const(value: Any) -> Callable[[nn.Module], Any]:
    return lambda root: value


def _attr(path: str) -> Callable[[nn.Module], Any]:
    """A parameter, buffer or attribute read from the (continual) root at each call."""
    *mods, name = path.split(".")
    sub = ".".join(mods)
    return lambda root: getattr(root.get_submodule(sub) if sub else root, name)


def _never(root: nn.Module) -> Any:
    raise RuntimeError("unreachable")


def _describe(x: Any) -> str:
    if isinstance(x, Tensor):
        return f"a tensor of shape {tuple(x.shape)}"
    return type(x).__name__
