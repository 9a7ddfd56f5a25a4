"""``continual(model)``: convert a ``torch.nn`` model into a continual one, keeping its weights.

Conversion is driven by a registry of handlers, one per ``torch.nn`` module type. Parameters are
shared with the source model and keep their names, so ``load_state_dict`` of a checkpoint of the
original model works on the converted one.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from ..core._module import CoModule
from ..modules import _attention, _conv, _frame, _pool, _rnn, _transformer
from ..modules._pointwise import is_pointwise
from ..modules._sequential import Sequential

Handler = Callable[..., nn.Module]
_HANDLERS: dict[type[nn.Module], Handler] = {}


def register_handler(module_type: type[nn.Module], handler: Handler | None = None) -> Any:
    """Register ``handler(module, convert, **options)`` converting ``module_type`` instances.

    ``convert`` converts child modules (call it on your module's children). Usable as a
    decorator.

    Example:
        >>> import torch, costream as cs
        >>> class Block(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.conv = torch.nn.Conv1d(4, 4, 3, padding=1)
        ...     def forward(self, x):
        ...         return x + self.conv(x)
        >>> @cs.register_handler(Block)
        ... def _(block, convert, **options):
        ...     return cs.Residual(convert(block.conv))
        >>> cs.continual(torch.nn.Sequential(Block())).delay
        1
    """
    if handler is None:
        def decorate(fn: Handler) -> Handler:
            _HANDLERS[module_type] = fn
            return fn

        return decorate
    _HANDLERS[module_type] = handler
    return handler


def continual(model: nn.Module, *, temporal_window: int | None = None,
              attention: str = "exact", example: Tensor | None = None,
              time_dim: int = 2) -> nn.Module:
    """Convert ``model`` into a continual module that shares its parameters.

    Args:
        model: a ``torch.nn`` model built from supported modules (convolutions, pooling, linear,
            point-wise modules, ``nn.Sequential``), continual modules, or types with a handler
            registered through :func:`register_handler`.
        temporal_window: frames pooled by converted adaptive pools (their offline temporal
            output size must be 1), tokens attended over by converted attention layers and
            Transformer encoders. In a traced model, the input frames of the window the model
            classifies: each reduction over time then pools what reaches it from ``n`` frames.
        attention: how the retroactive attention of Transformer encoders of two or more layers
            updates the outputs of the window's tokens per step. ``"exact"`` (default)
            recomputes them from cached queries, keys and values (``2 n^2 d_h`` MACs per head):
            exact at any score, non-finite exactly where the window computation is.
            ``"running"`` updates running softmax sums (the paper's ``O(n d_h)`` update): it
            loses accuracy, down to NaN, for sharply peaked attention, and a non-finite token
            keeps outputs non-finite up to ``n - 1`` steps longer (see
            :class:`RetroactiveMultiheadAttention`). It is the layers' ``recompute`` flag
            (``"exact"``: ``True``).
        example: a clip shaped like the model's input, used when the model is converted by
            tracing its ``forward`` (a model with a custom ``forward``; see
            ``docs/converting.md``): time axes and delays are propagated from it. Without it,
            a clip is guessed from the first convolution (``(2, C_in, 24, 32, ...)``).
        time_dim: the time axis of the model's input clips (default 2: ``(B, C, T, ...)``;
            e.g. 1 for ``(B, T, C)`` layouts). Models with ``time_dim != 2`` are traced.

    Raises:
        NotStreamableError: (a ``TypeError``) listing every operation that cannot stream, each
            with its module path, op, source line and reason.
        ValueError: for an ``attention`` other than ``"exact"`` or ``"running"``.

    Example:
        >>> import torch, costream as cs
        >>> net = torch.nn.Sequential(torch.nn.Conv1d(3, 8, 3), torch.nn.ReLU(),
        ...                           torch.nn.Conv1d(8, 2, 3))
        >>> co = cs.continual(net)
        >>> co.receptive_field
        5
        >>> co.load_state_dict(net.state_dict())  # same names
        <All keys matched successfully>
    """
    if attention not in ("exact", "running"):
        raise ValueError(f"attention must be 'exact' or 'running', got {attention!r}")
    options = {"temporal_window": temporal_window, "attention": attention}
    if isinstance(time_dim, bool) or not isinstance(time_dim, int) or time_dim < 1:
        raise ValueError(f"time_dim must be an int >= 1 (dim 0 is the batch), got {time_dim!r}")
    if time_dim == 2:
        try:
            return _convert(model, "", options)
        except _NoHandler:
            if not isinstance(model, nn.Module) or is_pointwise(model):
                raise
    if not isinstance(model, nn.Module):
        raise TypeError(f"continual() expects a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, CoModule):
        return model
    from ._trace import trace_graph

    def convert(module: nn.Module, path: str, window: int | None) -> nn.Module:
        opts = dict(options)
        if window is not None:
            opts["temporal_window"] = window
        return _convert(module, path, opts)

    return trace_graph(model, _HANDLERS, convert, example=example, time_dim=time_dim,
                       temporal_window=temporal_window)


class _NoHandler(TypeError):
    """A module type without a handler that is not point-wise (the model may be traced)."""


def convert_child(module: nn.Module, name: str) -> nn.Module:
    """Convert a child given to a container constructor; errors name it by ``name``."""
    return _convert(module, name, {"temporal_window": None})


def _convert(module: nn.Module, path: str, options: dict[str, Any]) -> nn.Module:
    if isinstance(module, CoModule):
        return module
    handler = _HANDLERS.get(type(module))
    if handler is not None:
        keep = {id(m) for m in module.modules()}  # shared source modules keep their own mode

        def convert(child: nn.Module, name: str = "") -> nn.Module:
            out = _convert(child, f"{path}.{name}" if path and name else name or path, options)
            keep.add(id(out))  # a converted child carries its own source's mode
            return out

        try:
            result = handler(module, convert, **options)
        except TypeError as err:
            if "unexpected keyword" not in str(err):
                raise
            result = handler(module, convert)
        # the result and the modules its handler built get the source's training flag
        todo = [] if result is module else [result]
        while todo:
            m = todo.pop()
            m.training = module.training
            todo.extend(c for c in m.children() if id(c) not in keep)
        return result
    if is_pointwise(module):
        return module
    where = f"'{path}'" if path else "the model itself"
    name = type(module).__name__
    temporal = [p for p, m in module.named_modules() if p and type(m) in _HANDLERS]
    if temporal:
        raise _NoHandler(
            f"cannot make {name} ({where}) continual on its own: it has no handler and contains "
            f"temporal layers ({', '.join(temporal[:3])}{', ...' if len(temporal) > 3 else ''}). "
            f"Convert the model that contains it with costream.continual(model, example=clip) "
            f"to trace its forward, or register a handler with costream.register_handler("
            f"{name}, fn)."
        )
    raise _NoHandler(
        f"cannot make {name} ({where}) continual: it may mix time steps and no "
        f"handler is registered for it. Convert the model with costream.continual(model, "
        f"example=clip) to trace its forward, register a handler with "
        f"costream.register_handler({name}, fn), or costream.register_pointwise({name}) "
        f"if it acts on each time step independently."
    )


def _sequential(module: nn.Sequential, convert: Callable, **_: Any) -> nn.Module:
    return Sequential(OrderedDict((name, convert(child, name))
                                  for name, child in module.named_children()))


def _windowed(cls: type, unit: str = "frames it pools over",
              takes_attention: bool = False) -> Handler:
    """Handler for a layer that needs the window length (``continual(..., temporal_window=n)``);
    with ``takes_attention``, ``continual(..., attention=...)`` sets its ``recompute`` flag."""

    def handler(module: nn.Module, convert: Callable, temporal_window: int | None = None,
                attention: str = "exact", **_: Any) -> nn.Module:
        if temporal_window is None:
            raise TypeError(
                f"converting {type(module).__name__} needs the number of {unit} online: "
                f"continual(model, temporal_window=n)"
            )
        if takes_attention:
            return cls.from_torch(module, temporal_window, recompute=attention == "exact")
        return cls.from_torch(module, temporal_window)

    return handler


def _from_torch(cls: type) -> Handler:
    def handler(module: nn.Module, convert: Callable, **_: Any) -> nn.Module:
        return cls.from_torch(module)

    return handler


register_handler(nn.Sequential, _sequential)
for _n in (1, 2, 3):
    register_handler(getattr(nn, f"Conv{_n}d"), _from_torch(getattr(_conv, f"Conv{_n}d")))
    for _kind in ("Avg", "Max"):
        register_handler(getattr(nn, f"{_kind}Pool{_n}d"),
                         _from_torch(getattr(_pool, f"{_kind}Pool{_n}d")))
        register_handler(getattr(nn, f"Adaptive{_kind}Pool{_n}d"),
                         _windowed(getattr(_pool, f"Adaptive{_kind}Pool{_n}d")))
register_handler(nn.Linear, _from_torch(_frame.Linear))
_TOKENS = "tokens it attends over"
register_handler(nn.MultiheadAttention,
                 _windowed(_attention.SingleOutputMultiheadAttention, _TOKENS))
register_handler(nn.TransformerEncoderLayer,
                 _windowed(_transformer.TransformerEncoderLayer, _TOKENS, takes_attention=True))
register_handler(nn.TransformerEncoder,
                 _windowed(_transformer.TransformerEncoder, _TOKENS, takes_attention=True))
for _torch_rnn in ("RNN", "LSTM", "GRU"):
    register_handler(getattr(nn, _torch_rnn), _from_torch(getattr(_rnn, _torch_rnn)))
