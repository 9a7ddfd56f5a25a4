"""Per-frame maps: modules that act on every time step independently.

:class:`Linear` (over the channel dimension), :class:`Reshape`, :class:`Lambda`,
:class:`Broadcast` and :class:`Reduce` have no state and no delay; stepping applies the map to
the frame, ``forward`` applies it to every frame of the clip.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core._module import Age, CoModule
from ._onednn import linear


class _FrameMap(CoModule):
    """A stateless map applied to each frame."""

    def _map(self, x: Any) -> Any:
        raise NotImplementedError

    def _map_clip(self, x: Any) -> Any:
        """Apply the map to a clip ``(B, C, T, *S)``: by default frame by frame, batched."""
        b, t = x.shape[0], x.shape[2]
        if t == 0:  # map one dummy frame for the output shape
            y = self._map(x.new_zeros(b, *x.shape[1:2], *x.shape[3:]))
            return y.unsqueeze(2)[:, :, :0]
        frames = x.movedim(2, 1).reshape(b * t, *x.shape[1:2], *x.shape[3:])
        y = self._map(frames)
        return y.reshape(b, t, *y.shape[1:]).movedim(1, 2)

    def _init(self, batch: int, shape: Any, device: torch.device, dtype: torch.dtype):
        probe = _zeros_like_shape(shape, device, dtype)
        return None, _shape_of(self._map(probe))

    def _step(self, x: Any, state: Any, age: Age, phase: int):
        return self._map(x), state, age, phase

    def _steps(self, x: Any, state: Any, age: Age, phase: int):
        return self._map_clip(x), state, age, phase

    def _clip(self, x: Any) -> Any:
        return self._map_clip(x)


def _zeros_like_shape(shape: Any, device: torch.device, dtype: torch.dtype) -> Any:
    if shape and isinstance(shape[0], tuple):
        return tuple(_zeros_like_shape(s, device, dtype) for s in shape)
    return torch.zeros(1, *shape, device=device, dtype=dtype)


def _shape_of(y: Any) -> Any:
    if isinstance(y, (tuple, list)):
        return tuple(_shape_of(v) for v in y)
    return tuple(y.shape[1:])


class Linear(_FrameMap, nn.Linear):
    """A linear map over the channel dimension (dim 1) of every frame.

    Same constructor and parameters as :class:`torch.nn.Linear`. Clips ``(B, C_in, T, *S)`` map
    to ``(B, C_out, T, *S)``; frames ``(B, C_in, *S)`` to ``(B, C_out, *S)``.

    Example:
        >>> import torch, costream as cs
        >>> lin = cs.Linear(8, 3)
        >>> lin.forward_step(torch.randn(2, 8)).shape
        torch.Size([2, 3])
    """

    @classmethod
    def from_torch(cls, linear: nn.Linear) -> Linear:
        """A continual linear map sharing ``linear``'s parameters."""
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                  device="meta")
        new.weight = linear.weight
        new.bias = linear.bias
        return new

    def _input_spec(self) -> tuple[int | None, int | None]:
        return None, self.in_features

    def _map(self, x: Tensor) -> Tensor:
        if x.dim() == 2:
            return linear(x, self.weight, self.bias)
        return linear(x.movedim(1, -1), self.weight, self.bias).movedim(-1, 1)

    def _map_clip(self, x: Tensor) -> Tensor:
        if x.dim() < 3 or x.shape[1] != self.in_features:
            raise ValueError(f"Linear expects clips (B, {self.in_features}, T, ...) with the "
                             f"channels on dim 1, got shape {tuple(x.shape)}")
        return F.linear(x.movedim(1, -1), self.weight, self.bias).movedim(-1, 1)


class Reshape(_FrameMap):
    """Reshape every frame to ``shape`` (without the batch dimension); ``-1`` is inferred.

    Example:
        >>> import torch, costream as cs
        >>> flat = cs.Reshape(-1)  # (B, C, H, W) frames -> (B, C * H * W)
        >>> flat.forward_step(torch.randn(2, 3, 4, 4)).shape
        torch.Size([2, 48])
    """

    def __init__(self, *shape: int) -> None:
        super().__init__()
        self.shape = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], Sequence) \
            else tuple(shape)

    def extra_repr(self) -> str:
        return f"shape={self.shape}"

    def _map(self, x: Tensor) -> Tensor:
        return x.reshape(x.shape[0], *self.shape)


class Lambda(_FrameMap):
    """Apply ``fn`` to every frame ``(B, C, *S)``; ``fn`` must not mix time steps.

    Example:
        >>> import torch, costream as cs
        >>> sq = cs.Lambda(torch.square)
        >>> sq.forward_step(torch.full((1, 2), 3.0))
        tensor([[9., 9.]])
    """

    def __init__(self, fn: Callable[[Any], Any]) -> None:
        super().__init__()
        self.fn = fn

    def extra_repr(self) -> str:
        return getattr(self.fn, "__name__", repr(self.fn))

    def _map(self, x: Any) -> Any:
        return self.fn(x)


class Broadcast(_FrameMap):
    """Turn one input into a tuple of ``n`` references to it (for :class:`Parallel` branches).

    Example:
        >>> import torch, costream as cs
        >>> len(cs.Broadcast(3).forward_step(torch.zeros(1, 2)))
        3
    """

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = int(n)

    def extra_repr(self) -> str:
        return f"n={self.n}"

    def _map(self, x: Any) -> tuple:
        return (x,) * self.n

    _map_clip = _map


ReduceOp = Literal["sum", "mul", "concat", "max"]


def reduce_fn(op: ReduceOp) -> Callable[[Sequence[Tensor]], Tensor]:
    """The function that reduces a tuple of aligned tensors with ``op``."""
    if op == "sum":
        return lambda xs: functools.reduce(operator.add, xs)
    if op == "mul":
        return lambda xs: functools.reduce(operator.mul, xs)
    if op == "max":
        return lambda xs: functools.reduce(torch.maximum, xs)
    if op == "concat":
        return lambda xs: torch.cat(tuple(xs), dim=1)
    raise ValueError(f"reduce must be one of 'sum', 'mul', 'concat', 'max'; got {op!r}")


class Reduce(_FrameMap):
    """Reduce a tuple of tensors into one: ``"sum"``, ``"mul"``, ``"max"`` or ``"concat"``
    (along channels).

    Example:
        >>> import torch, costream as cs
        >>> cs.Reduce("concat").forward_step((torch.zeros(1, 2), torch.ones(1, 3))).shape
        torch.Size([1, 5])
    """

    def __init__(self, op: ReduceOp = "sum") -> None:
        super().__init__()
        self.op = op
        self._fn = reduce_fn(op)

    def extra_repr(self) -> str:
        return repr(self.op)

    def _map(self, xs: Sequence[Tensor]) -> Tensor:
        return self._fn(xs)

    _map_clip = _map
