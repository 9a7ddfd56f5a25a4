"""Continual multi-head attention (Continual Transformers, ICLR 2023, arXiv 2201.06268).

Tokens stream as frames ``(B, d)``; clips are ``(B, d, T)`` (embedding on dim 1, time on dim 2).
Attention runs over a sliding window of the last ``n`` tokens: receptive field ``n``, delay
``n - 1``. Two forms from the paper:

* :class:`SingleOutputMultiheadAttention` computes only the output of one query (by default the
  newest token) against the ``n`` keys: ``2 n d_h`` multiply-accumulates per head and step.
* :class:`RetroactiveMultiheadAttention` updates the outputs of all ``n`` tokens of the window.
  By default (``recompute=True``) it recomputes them from cached queries, keys and values
  (``2 n^2 d_h`` per head and step, exact at any score); ``recompute=False`` selects the paper's
  update (``7 n d_h`` per head and step in its count), which adds the new token's terms to
  running softmax sums and removes the terms of the token that left the window.

:class:`_WindowAttention` is the shared streaming wrapper, also used by the Transformer encoder
layers; the kernels live in ``_attention_ops``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..core._module import Age, CoModule, advance
from ..core._temporal import Temporal
from . import _attention_ops as ops


def _check_window(window: int, query_index: int) -> tuple[int, int]:
    n = int(window)
    if n < 1:
        raise ValueError(f"window must be >= 1 tokens, got {window}")
    i = int(query_index)
    if not -n <= i < n:
        raise ValueError(f"query_index must be in [-{n}, {n - 1}] for a window of {n}, got {i}")
    return n, i % n


def seq_call(fn: Any, windows: Tensor, batch_first: bool) -> Tensor:
    """Apply a ``torch.nn`` sequence function to windows ``(N, n, d)`` in its own layout."""
    if batch_first:
        return fn(windows)
    return fn(windows.transpose(0, 1)).transpose(0, 1)


class _WindowAttention(CoModule):
    """Streaming over a window of ``n`` tokens around one stateful attention block.

    Subclasses set ``window`` and ``query_index`` (normalised to ``0..n-1``) and implement
    ``_parts`` (the stateful block), ``_retroactive`` (its form), ``_keep_tokens`` (whether the
    state keeps the raw tokens), ``_reference`` (the offline ``torch.nn`` computation on windows
    ``(N, n, d)``, all ``n`` outputs) and optionally ``_head`` (what follows the stateful block:
    ``(B, d)`` or ``(B, n, d)`` tokens in, ``(B, d)`` or ``(B, n, d)`` out).
    """

    window: int
    query_index: int
    recompute: bool = True

    def _parts(self) -> ops.Parts:
        raise NotImplementedError

    def _retroactive(self) -> bool:
        raise NotImplementedError

    def _keep_tokens(self) -> bool:
        raise NotImplementedError

    def _reference(self, windows: Tensor) -> Tensor:
        raise NotImplementedError

    def _head(self, y: Tensor) -> Tensor:
        return y

    def _dropouts(self) -> list[float]:
        return []

    def _embed_dim(self) -> int:
        return self._parts().mha.embed_dim

    def _window_output(self) -> bool:
        """Whether an output frame holds all ``n`` window tokens ``(B, d, n)``."""
        return False

    # ------------------------------------------------------------------ geometry
    def _temporal(self) -> Temporal:
        return Temporal(self.window, 1, 0, 0)

    def _input_spec(self) -> tuple[int | None, int | None]:
        return 2, self._embed_dim()

    def _check_stepping(self) -> None:
        if self.training and any(p > 0 for p in self._dropouts()):
            raise RuntimeError(
                f"stepping {type(self).__name__} with dropout in training mode; call .eval() "
                f"first (continual attention steps only in inference)"
            )

    # ------------------------------------------------------------------ state and steps
    def _init(self, batch: int, shape: Any, device: torch.device, dtype: torch.dtype):
        d = self._embed_dim()
        if tuple(shape) != (d,):
            raise ValueError(f"{type(self).__name__} expects token frames (B, {d}), got frames "
                             f"of shape {tuple(shape)}")
        if self._retroactive():
            state = ops.retro_init(self._parts(), batch, self.window, self._keep_tokens(), device,
                                   dtype, running=not self.recompute)
        else:
            state = ops.single_init(self._parts(), batch, self.window, self._keep_tokens(),
                                    device, dtype)
        return state, ((d, self.window) if self._window_output() else (d,))

    def _frame(self, y: Tensor) -> Tensor:
        return y.transpose(1, 2) if y.dim() == 3 else y

    def _step(self, x: Tensor, state: dict, age: Age, phase: int):
        self._check_stepping()
        n = self.window
        if self._retroactive():
            masks = (None, None) if self.recompute else ops.retro_masks(age, n, x.device)
            y, state = ops.retro_step(self._parts(), x, state, n, masks)
        else:
            y, state = ops.single_step(self._parts(), x, state, n, self.query_index)
        out_age, out_phase = advance(age, phase, n - 1, 1)
        if isinstance(out_age, int) and out_age < 0:
            return None, state, None, 0
        return self._frame(self._head(y)), state, out_age, out_phase

    def _steps(self, x: Tensor, state: dict, age: Age, phase: int):
        if isinstance(age, Tensor):
            return super()._steps(x, state, age, phase)
        self._check_stepping()
        b, _, t = x.shape
        if t == 0:
            return None, state, None, 0
        n = self.window
        first = 0 if age is None else min(t, max(0, n - 1 - age))
        tokens = x.transpose(1, 2)
        if self._retroactive():
            valid = None
            if age is not None and age + t - n < 0 and not self.recompute:
                valid = (torch.arange(age + t - n, age + t, device=x.device) >= 0).view(1, n)
            y, state = ops.retro_chunk(self._parts(), tokens, state, n, first, valid)
        else:
            y, state = ops.single_chunk(self._parts(), tokens, state, n, self.query_index, first)
        if y is None:
            return None, state, None, 0
        y = self._head(y)
        y = y.reshape(b, t - first, *y.shape[1:]).movedim(-1, 1)  # (B, d, T', [n])
        out_age, out_phase = advance(None if age is None else age + first, phase + first,
                                     n - 1, 1)
        return y, state, out_age, out_phase

    # ------------------------------------------------------------------ offline
    def _clip(self, x: Tensor) -> Tensor:
        d, n = self._embed_dim(), self.window
        if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[1] != d:
            raise ValueError(f"{type(self).__name__}.forward expects a clip (B, {d}, T), got "
                             f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
        b, _, t = x.shape
        tp = max(0, t - n + 1)
        if tp == 0:
            return x.new_zeros(b, d, 0, *((n,) if self._window_output() else ()))
        windows = x.unfold(2, n, 1).permute(0, 2, 3, 1).reshape(b * tp, n, d)
        y = self._reference(windows)  # (N, n, d)
        if self._window_output():
            return y.reshape(b, tp, n, d).permute(0, 3, 1, 2)
        return y[:, self.query_index].reshape(b, tp, d).transpose(1, 2)


class _CoMultiheadAttention(_WindowAttention, nn.MultiheadAttention):
    """Shared construction and conversion of the two continual self-attention forms."""

    def _setup(self, embed_dim: int, num_heads: int, dropout: float, bias: bool,
               batch_first: bool, device: Any, dtype: Any, window: int, query_index: int,
               recompute: bool) -> None:
        nn.MultiheadAttention.__init__(self, embed_dim, num_heads, dropout=dropout, bias=bias,
                                       batch_first=batch_first, device=device, dtype=dtype)
        self.window, self.query_index = _check_window(window, query_index)
        self.recompute = bool(recompute)

    @classmethod
    def from_torch(cls, mha: nn.MultiheadAttention, window: int,
                   **options: Any) -> _CoMultiheadAttention:
        """Continual self-attention over ``window`` tokens sharing ``mha``'s parameters;
        ``options`` are the class's keyword arguments (``query_index``, or ``recompute`` of the
        retroactive form)."""
        if not mha._qkv_same_embed_dim or mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError("continual attention supports self-attention with equal q/k/v "
                             "dims, without add_bias_kv or add_zero_attn")
        new = cls(mha.embed_dim, mha.num_heads, dropout=mha.dropout,
                  bias=mha.in_proj_bias is not None, batch_first=mha.batch_first, device="meta",
                  window=window, **options)
        new.in_proj_weight = mha.in_proj_weight
        new.in_proj_bias = mha.in_proj_bias
        new.out_proj = mha.out_proj
        new.train(mha.training)
        return new

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, window={self.window}"

    def _parts(self) -> ops.Parts:
        return ops.Parts(self)

    def _dropouts(self) -> list[float]:
        return [self.dropout]

    def _reference(self, windows: Tensor) -> Tensor:
        def attend(w: Tensor) -> Tensor:
            return nn.MultiheadAttention.forward(self, w, w, w, need_weights=False)[0]

        return seq_call(attend, windows, self.batch_first)


class SingleOutputMultiheadAttention(_CoMultiheadAttention):
    """Continual self-attention over the last ``window`` tokens, one query per step.

    Parameters and constructor follow :class:`torch.nn.MultiheadAttention` (self-attention only),
    plus:

    Args:
        window: ``n``, the number of tokens attended over.
        query_index: window position whose output is returned (``-1``: the newest token).

    A step projects the new token, appends its key and value to the ``n - 1`` kept ones and
    attends the chosen query to them: ``2 n d_h`` multiply-accumulates per head (Continual
    Transformers, arXiv 2201.06268).

    Shape:
        clip ``(B, d, T)`` -> ``(B, d, T - n + 1)``: output ``t`` is ``torch.nn``'s attention over
        tokens ``t .. t + n - 1`` at position ``query_index``; frame ``(B, d)`` -> ``(B, d)``.

    Example:
        >>> import torch, costream as cs
        >>> att = cs.SingleOutputMultiheadAttention(8, 2, window=4).double().eval()
        >>> x = torch.randn(1, 8, 10, dtype=torch.double)
        >>> torch.allclose(att.forward_steps(x), att(x))
        True
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 batch_first: bool = False, device: Any = None, dtype: Any = None, *,
                 window: int, query_index: int = -1) -> None:
        self._setup(embed_dim, num_heads, dropout, bias, batch_first, device, dtype, window,
                    query_index, True)

    def _retroactive(self) -> bool:
        return False

    def _keep_tokens(self) -> bool:
        return self.query_index != self.window - 1


class RetroactiveMultiheadAttention(_CoMultiheadAttention):
    """Continual self-attention that updates the outputs of all ``window`` tokens per step.

    Parameters and constructor follow :class:`torch.nn.MultiheadAttention` (self-attention only),
    plus:

    Args:
        window: ``n``, the number of tokens attended over.
        recompute: recompute the ``n`` outputs from the cached queries, keys and values every
            step (the default: regular attention over the window, ``2 n^2 d_h`` per head, exact
            at any score); ``False`` updates running softmax sums instead (the paper's
            ``O(n d_h)`` update, inexact for peaked attention: see below).

    With ``recompute=False`` each step adds the new token's key/value to the running softmax
    sums of the kept queries, removes those of the token that left the window and computes the
    new query's sums (Continual Transformers, arXiv 2201.06268). Sums are kept relative to the
    largest score each query has seen (no overflow) and live only while their query is in the
    window, so rounding does not build up over a stream. Removing a term is a subtraction,
    though: when the token leaving the window held nearly all of a query's attention, the rest
    of that query's sum keeps only about ``eps * (its weight / the others' weight)`` relative
    accuracy, and at score gaps beyond ``ln(2 / eps)`` (~17 in float32, ~37 in float64) it
    cancels to ``0 / 0`` (NaN). A non-finite token also stays in the sums of the queries that
    saw it, so outputs stay non-finite up to ``n - 1`` steps longer than the window
    computation's. The default recomputation has neither defect: its outputs are finite
    exactly where torch's attention over the window is.

    Shape:
        clip ``(B, d, T)`` -> ``(B, d, T - n + 1, n)``: output ``t`` holds all ``n`` outputs of
        ``torch.nn``'s attention over tokens ``t .. t + n - 1``; frame ``(B, d)`` -> ``(B, d, n)``.

    Example:
        >>> import torch, costream as cs
        >>> att = cs.RetroactiveMultiheadAttention(8, 2, window=4).double().eval()
        >>> x = torch.randn(1, 8, 10, dtype=torch.double)
        >>> [att.forward_step(x[:, :, t]) is None for t in range(4)]
        [True, True, True, False]
        >>> torch.allclose(att.forward_step(x[:, :, 4]), att(x)[:, :, 1])
        True
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 batch_first: bool = False, device: Any = None, dtype: Any = None, *,
                 window: int, recompute: bool = True) -> None:
        self._setup(embed_dim, num_heads, dropout, bias, batch_first, device, dtype, window, -1,
                    recompute)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, recompute={self.recompute}"

    def _retroactive(self) -> bool:
        return True

    def _keep_tokens(self) -> bool:
        return False

    def _window_output(self) -> bool:
        return True
