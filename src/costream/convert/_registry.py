"""``continual(model)``: convert a ``torch.nn`` model into a continual one, keeping its weights.

Conversion is driven by a registry of handlers, one per ``torch.nn`` module type. Parameters are
shared with the source model and keep their names, so ``load_state_dict`` of a checkpoint of the
original model works on the converted one.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from torch import nn

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


def continual(model: nn.Module, *, temporal_window: int | None = None) -> nn.Module:
    """Convert ``model`` into a continual module that shares its parameters.

    Args:
        model: a ``torch.nn`` model built from supported modules (convolutions, pooling, linear,
            point-wise modules, ``nn.Sequential``), continual modules, or types with a handler
            registered through :func:`register_handler`.
        temporal_window: frames pooled by converted adaptive pools (their offline temporal
            output size must be 1).

    Raises:
        TypeError: naming the first module (by path) that mixes time steps and has no handler.

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
    options = {"temporal_window": temporal_window}
    return _convert(model, "", options)


def convert_child(module: nn.Module, name: str) -> nn.Module:
    """Convert a child given to a container constructor; errors name it by ``name``."""
    return _convert(module, name, {"temporal_window": None})


def _convert(module: nn.Module, path: str, options: dict[str, Any]) -> nn.Module:
    if isinstance(module, CoModule):
        return module
    handler = _HANDLERS.get(type(module))
    if handler is not None:
        def convert(child: nn.Module, name: str = "") -> nn.Module:
            return _convert(child, f"{path}.{name}" if path and name else name or path, options)

        try:
            return handler(module, convert, **options)
        except TypeError as err:
            if "unexpected keyword" not in str(err):
                raise
            return handler(module, convert)
    if is_pointwise(module):
        return module
    where = f"'{path}'" if path else "the model itself"
    raise TypeError(
        f"cannot make {type(module).__name__} ({where}) continual: it may mix time steps and no "
        f"handler is registered for it. Register one with costream.register_handler("
        f"{type(module).__name__}, fn), or costream.register_pointwise({type(module).__name__}) "
        f"if it acts on each time step independently."
    )


def _sequential(module: nn.Sequential, convert: Callable, **_: Any) -> nn.Module:
    return Sequential(OrderedDict((name, convert(child, name))
                                  for name, child in module.named_children()))


def _windowed(cls: type, unit: str = "frames it pools over") -> Handler:
    """Handler for a layer that needs the window length (``continual(..., temporal_window=n)``)."""

    def handler(module: nn.Module, convert: Callable, temporal_window: int | None = None,
                **_: Any) -> nn.Module:
        if temporal_window is None:
            raise TypeError(
                f"converting {type(module).__name__} needs the number of {unit} online: "
                f"continual(model, temporal_window=n)"
            )
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
                 _windowed(_transformer.TransformerEncoderLayer, _TOKENS))
register_handler(nn.TransformerEncoder, _windowed(_transformer.TransformerEncoder, _TOKENS))
for _torch_rnn in ("RNN", "LSTM", "GRU"):
    register_handler(getattr(nn, _torch_rnn), _from_torch(getattr(_rnn, _torch_rnn)))
