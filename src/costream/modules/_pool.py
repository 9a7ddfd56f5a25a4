"""Continual pooling: average and max pooling over a window of past frames.

Pools keep the last ``receptive_field - 1`` input frames (a tuple of frame tensors, so a step
shifts Python references, not memory) and pool over the window when an output is due.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core._module import Age, CoModule, advance, chunk_emissions, crop_warm_up, emits
from ..core._temporal import Temporal, as_ints


def _tuple(v: Any, n: int) -> tuple[int, ...]:
    """``v`` as ``n`` Python ints (numpy integers, as PyTorchVideo builds them, included)."""
    return as_ints(tuple(v) if isinstance(v, (tuple, list)) else (v,) * n)


class _WindowPool(CoModule):
    """Pooling over the last ``window`` frames; subclasses define the window operation."""

    _pad_value: float = 0.0

    def _window_geometry(self) -> tuple[int, int, int, int]:
        """(kernel, dilation, stride, padding) along time."""
        raise NotImplementedError

    def _frame_op(self, x: Tensor) -> Tensor:
        """Per-frame work done before buffering (identity by default)."""
        return x

    def _window_op(self, win: Tensor, stride: int) -> Tensor:
        """Pool ``win`` ``(B, C, L, *S)`` along time with ``stride``: ``(B, C, n, *S_out)``."""
        raise NotImplementedError

    def _temporal(self) -> Temporal:
        k, d, s, p = self._window_geometry()
        return Temporal((k - 1) * d + 1, s, p, p)

    def _frame_shape_after(self, shape: tuple) -> tuple:
        return shape

    def _init(self, batch: int, shape: Any, device: torch.device, dtype: torch.dtype):
        inner = self._frame_shape_after(tuple(shape))
        probe = torch.zeros(1, inner[0], self.temporal.receptive_field, *inner[1:], device=device,
                            dtype=dtype)
        out = self._window_op(probe, 1)
        buf = tuple(torch.full((batch, *inner), self._pad_value, device=device, dtype=dtype)
                    for _ in range(self.temporal.receptive_field - 1))
        return buf, (out.shape[1], *out.shape[3:])

    def _step(self, x: Tensor, state: tuple, age: Age, phase: int):
        return self._push(self._frame_op(x), state, age, phase)

    def _push(self, x: Tensor, state: tuple, age: Age, phase: int):
        """One frame that already went through ``_frame_op``."""
        if isinstance(age, Tensor) and self._window_geometry()[3] > 0:
            x = torch.where((age >= 0).view(-1, *(1,) * (x.dim() - 1)), x, self._pad_value)
        _, _, s, p = self._window_geometry()
        delay = self.temporal.receptive_field - 1 - p
        new = (*state[1:], x) if state else ()
        if not emits(phase, delay, s):
            return None, new, None, 0
        out_age, out_phase = advance(age, phase, delay, s)
        if isinstance(out_age, int) and out_age < 0:
            return None, new, None, 0
        y = self._window_op(torch.stack((*state, x), dim=2), 1)[:, :, 0]
        return y, new, out_age, out_phase

    def _steps(self, x: Tensor, state: tuple, age: Age, phase: int):
        b, c, t = x.shape[:3]
        if t == 0:
            return None, state, None, 0
        x = self._frame_op(x.transpose(1, 2).reshape(b * t, c, *x.shape[3:]))
        return self._push_chunk(x.view(b, t, *x.shape[1:]).transpose(1, 2), state, age, phase)

    def _push_chunk(self, x: Tensor, state: tuple, age: Age, phase: int):
        """Frames ``(B, C, T, *S)`` that already went through ``_frame_op``."""
        t = x.shape[2]
        if isinstance(age, Tensor):
            outs, first_age, first_phase = [], None, 0
            for i in range(t):
                y, state, a, p = self._push(x[:, :, i], state, age + i, phase + i)
                if y is not None:
                    if not outs:
                        first_age, first_phase = a, p
                    outs.append(y)
            if not outs:
                return None, state, None, 0
            return torch.stack(outs, 2), state, first_age, first_phase
        win = torch.cat((torch.stack(state, 2), x), 2) if state else x
        new = tuple(win[:, :, win.shape[2] - len(state) + i] for i in range(len(state)))
        _, _, s, p = self._window_geometry()
        delay = self.temporal.receptive_field - 1 - p
        first, n = chunk_emissions(t, phase, delay, s)
        if n == 0:
            return None, new, None, 0
        out_age, out_phase = advance(None if age is None else age + first, phase + first,
                                     delay, s)
        y = self._window_op(win[:, :, first:], s)[:, :, :n]
        y, out_age, out_phase = crop_warm_up(y, out_age, out_phase)
        return y, new, out_age, out_phase

    def _flush(self, state: tuple, age: Age, phase: int):
        pad = self.temporal.end_padding
        if pad <= 0 or not state:
            return None, state, None, 0
        ref = state[0]
        frames = torch.full((ref.shape[0], ref.shape[1], pad, *ref.shape[2:]), self._pad_value,
                            dtype=ref.dtype, device=ref.device)
        return self._push_chunk(frames, state, age, phase)


class _CoPoolNd(_WindowPool):
    """Shared implementation of the continual ``AvgPool{1,2,3}d`` / ``MaxPool{1,2,3}d``."""

    _torch_base: type[nn.Module]
    _ndim: int
    _max: bool

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for name in ("kernel_size", "stride", "padding", "dilation"):
            if hasattr(self, name):
                setattr(self, name, as_ints(getattr(self, name)))
        n = self._ndim
        if self.ceil_mode:
            raise ValueError("continual pooling does not support ceil_mode=True")
        if getattr(self, "return_indices", False):
            raise ValueError("continual pooling does not support return_indices=True")
        self._k = _tuple(self.kernel_size, n)
        self._s = _tuple(self.stride if self.stride is not None else self.kernel_size, n)
        self._p = _tuple(self.padding, n)
        self._d = _tuple(getattr(self, "dilation", 1), n)
        if not self._max and self._p[0] and not self.count_include_pad:
            raise ValueError("continual AvgPool with temporal padding needs count_include_pad=True")
        self._pad_value = float("-inf") if self._max else 0.0

    @classmethod
    def from_torch(cls, pool: nn.Module) -> _CoPoolNd:
        """A continual pool with the configuration of ``pool``."""
        names = ("kernel_size", "stride", "padding", "dilation", "return_indices", "ceil_mode",
                 "count_include_pad", "divisor_override")
        return cls(**{k: getattr(pool, k) for k in names if hasattr(pool, k)})

    def _window_geometry(self) -> tuple[int, int, int, int]:
        return self._k[0], self._d[0], self._s[0], self._p[0]

    def _input_spec(self) -> tuple[int | None, int | None]:
        return self._ndim + 1, None

    def _window_op(self, win: Tensor, stride: int) -> Tensor:
        n = self._ndim
        fn = getattr(F, f"{'max' if self._max else 'avg'}_pool{n}d")
        kw: dict[str, Any] = {"kernel_size": self._k, "stride": (stride, *self._s[1:]),
                              "padding": (0, *self._p[1:])}
        if self._max:
            kw["dilation"] = self._d
        else:
            kw["count_include_pad"] = self.count_include_pad
            if n > 1:
                kw["divisor_override"] = self.divisor_override
        return fn(win, **kw)

    def _clip(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or x.dim() != self._ndim + 2:
            raise ValueError(f"{type(self).__name__}.forward expects a clip with {self._ndim + 2}"
                             f" dims (B, C, T, ...), got {getattr(x, 'shape', type(x))}")
        return self._torch_base.forward(self, x)


def _pool_doc(kind: str, n: int) -> str:
    clip = "(B, C, T" + ", S" * (n - 1) + ")"
    return f"""Continual {kind} pooling over time{' and space' if n > 1 else ''}: clips {clip}.

    Same constructor as :class:`torch.nn.{kind}Pool{n}d` (``ceil_mode`` must be ``False``);
    the first kernel dimension is time.

    Example:
        >>> import torch, costream as cs
        >>> pool = cs.{kind}Pool{n}d({'3' if n == 1 else '(3' + ', 2' * (n - 1) + ')'}, stride=1)
        >>> pool = pool.double()
        >>> x = torch.randn(1, 4, 9{', 6' * (n - 1)}, dtype=torch.double)
        >>> torch.allclose(pool.forward_steps(x, pad_end=True), pool(x))
        True
    """


def _make_pool(kind: str, n: int) -> type[_CoPoolNd]:
    base = getattr(nn, f"{kind}Pool{n}d")
    cls = type(f"{kind}Pool{n}d", (_CoPoolNd, base), {
        "_torch_base": base, "_ndim": n, "_max": kind == "Max", "__doc__": _pool_doc(kind, n),
        "__module__": __name__,
    })
    return cls


AvgPool1d = _make_pool("Avg", 1)
AvgPool2d = _make_pool("Avg", 2)
AvgPool3d = _make_pool("Avg", 3)
MaxPool1d = _make_pool("Max", 1)
MaxPool2d = _make_pool("Max", 2)
MaxPool3d = _make_pool("Max", 3)


class _AdaptivePool(_WindowPool):
    """Pooling over a fixed window of ``window`` frames, adaptive over space."""

    _ndim: int
    _max: bool

    def __init__(self, output_size: Any, window: int) -> None:
        super().__init__()
        size = _tuple(output_size, self._ndim)
        if size[0] not in (1, None):
            raise ValueError(
                f"a continual adaptive pool pools one window of `window` frames into one frame; "
                f"its temporal output size must be 1, got {size[0]}"
            )
        if int(window) < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.output_size = (1, *size[1:])
        self.window = int(window)
        self._pad_value = float("-inf") if self._max else 0.0

    @classmethod
    def from_torch(cls, pool: nn.Module, window: int) -> _AdaptivePool:
        """A continual adaptive pool with ``pool``'s output size over ``window`` frames."""
        if getattr(pool, "return_indices", False):
            raise ValueError("continual pooling does not support return_indices=True")
        return cls(pool.output_size, window)

    def extra_repr(self) -> str:
        return f"output_size={self.output_size}, window={self.window}"

    def _window_geometry(self) -> tuple[int, int, int, int]:
        return self.window, 1, 1, 0

    def _input_spec(self) -> tuple[int | None, int | None]:
        return self._ndim + 1, None

    def _frame_op(self, x: Tensor) -> Tensor:
        if self._ndim == 1:
            return x
        fn = getattr(F, f"adaptive_{'max' if self._max else 'avg'}_pool{self._ndim - 1}d")
        return fn(x, self.output_size[1:])

    def _frame_shape_after(self, shape: tuple) -> tuple:
        return (shape[0], *self._frame_op(torch.zeros(1, *shape)).shape[2:])

    def _window_op(self, win: Tensor, stride: int) -> Tensor:
        n = self._ndim
        fn = getattr(F, f"{'max' if self._max else 'avg'}_pool{n}d")
        return fn(win, kernel_size=(self.window, *(1,) * (n - 1)), stride=(stride, *(1,) * (n - 1)))

    def _clip(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or x.dim() != self._ndim + 2:
            raise ValueError(f"{type(self).__name__}.forward expects a clip with {self._ndim + 2}"
                             f" dims (B, C, T, ...), got {getattr(x, 'shape', type(x))}")
        b, c, t = x.shape[:3]
        frames = self._frame_op(x.transpose(1, 2).reshape(b * t, c, *x.shape[3:]))
        frames = frames.view(b, t, c, *frames.shape[2:]).transpose(1, 2)
        return self._window_op(frames, 1)


def _adaptive_doc(kind: str, n: int) -> str:
    return f"""Continual adaptive {kind.lower()} pooling: one output frame per step from the last
    ``window`` frames, adaptive over space to ``output_size[1:]``.

    On a clip of exactly ``window`` frames ``forward`` equals
    :class:`torch.nn.Adaptive{kind}Pool{n}d` with temporal output size 1; on longer clips it
    slides over time with stride 1.

    Example:
        >>> import torch, costream as cs
        >>> size = {'1' if n == 1 else '(1' + ', 1' * (n - 1) + ')'}
        >>> pool = cs.Adaptive{kind}Pool{n}d(size, window=4)
        >>> pool.forward_steps(torch.randn(2, 8, 6{', 5' * (n - 1)})).shape[2]
        3
    """


def _make_adaptive(kind: str, n: int) -> type[_AdaptivePool]:
    return type(f"Adaptive{kind}Pool{n}d", (_AdaptivePool,), {
        "_ndim": n, "_max": kind == "Max", "__doc__": _adaptive_doc(kind, n),
        "__module__": __name__,
    })


AdaptiveAvgPool1d = _make_adaptive("Avg", 1)
AdaptiveAvgPool2d = _make_adaptive("Avg", 2)
AdaptiveAvgPool3d = _make_adaptive("Avg", 3)
AdaptiveMaxPool1d = _make_adaptive("Max", 1)
AdaptiveMaxPool2d = _make_adaptive("Max", 2)
AdaptiveMaxPool3d = _make_adaptive("Max", 3)
