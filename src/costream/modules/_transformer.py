"""Continual Transformer encoders (Continual Transformers, ICLR 2023, arXiv 2201.06268).

A continual encoder attends over a sliding window of the last ``n`` tokens and returns, per step,
the output at one window position (by default the newest token) of the ``torch.nn`` encoder
applied to that window. Tokens stream as frames ``(B, d)``; clips are ``(B, d, T)``.

* One layer: a single-output layer (the chosen query against the ``n`` cached keys/values).
* Two layers: a retroactive first layer (the outputs of all ``n`` window tokens are updated, and
  its feed-forward block runs on all ``n``), then a single-output second layer over them. The
  retroactive attention recomputes the window from cached queries, keys and values (exact) unless
  ``recompute=False`` asks for the paper's running-sum update.
* More layers: retroactive first layer, regular attention over the ``n`` updated tokens in the
  middle layers (every window token changes each step, so they recompute the whole window:
  correct, at the cost of a regular layer), single-output last layer.

Parameter names are those of :class:`torch.nn.TransformerEncoderLayer` and
:class:`torch.nn.TransformerEncoder`, so their ``state_dict`` loads unchanged. Stepping runs in
inference mode only (dropout must be off).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from . import _attention_ops as ops
from ._attention import _check_window, _WindowAttention, seq_call
from ._onednn import linear

_LAYER_PARTS = ("self_attn", "linear1", "dropout", "linear2", "norm1", "norm2", "dropout1",
                "dropout2")


def _norm(m: nn.Module, x: Tensor) -> Tensor:
    if type(m) is nn.LayerNorm:
        return F.layer_norm(x, m.normalized_shape, m.weight, m.bias, m.eps)
    return m(x)


class TransformerEncoderLayer(_WindowAttention, nn.TransformerEncoderLayer):
    """Continual :class:`torch.nn.TransformerEncoderLayer` over a window of ``window`` tokens.

    Same constructor and parameters as the torch layer (``norm_first`` True or False, activation
    ``"relu"``, ``"gelu"`` or a callable, ``batch_first`` either way: it only sets the layout of
    the torch layer, streams are always ``(B, d)`` frames), plus:

    Args:
        window: ``n``, the number of tokens attended over.
        query_index: window position whose output is returned (``-1``: the newest token).
        retroactive: return the updated outputs of all ``n`` window tokens per step instead
            (retroactive attention; ``query_index`` is then unused).
        recompute: with ``retroactive``, recompute the attention of the ``n`` tokens from
            cached queries, keys and values each step (the default: exact at any score);
            ``False`` updates running softmax sums instead (the paper's ``O(n d_h)`` update,
            inexact and possibly NaN for sharply peaked attention; see
            :class:`RetroactiveMultiheadAttention`).

    Shape:
        clip ``(B, d, T)`` -> ``(B, d, T - n + 1)`` (retroactive: ``(B, d, T - n + 1, n)``):
        output ``t`` is the torch layer applied to tokens ``t .. t + n - 1``; frame ``(B, d)``
        -> ``(B, d)`` (retroactive: ``(B, d, n)``).

    Example:
        >>> import torch, costream as cs
        >>> layer = cs.TransformerEncoderLayer(16, 4, 32, dropout=0.0, window=5).double()
        >>> x = torch.randn(2, 16, 12, dtype=torch.double)
        >>> steps = [layer.forward_step(x[:, :, t]) for t in range(12)]
        >>> steps[3] is None, torch.allclose(torch.stack(steps[4:], 2), layer(x))
        (True, True)
    """

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048,
                 dropout: float = 0.1,
                 activation: str | Callable[[Tensor], Tensor] = F.relu,
                 layer_norm_eps: float = 1e-5, batch_first: bool = False,
                 norm_first: bool = False, bias: bool = True, device: Any = None,
                 dtype: Any = None, *, window: int, query_index: int = -1,
                 retroactive: bool = False, recompute: bool = True) -> None:
        nn.TransformerEncoderLayer.__init__(
            self, d_model, nhead, dim_feedforward, dropout, activation, layer_norm_eps,
            batch_first, norm_first, bias, device, dtype)
        self.window, self.query_index = _check_window(window, query_index)
        self.retroactive = bool(retroactive)
        self.recompute = bool(recompute)

    @classmethod
    def from_torch(cls, layer: nn.TransformerEncoderLayer, window: int, query_index: int = -1,
                   retroactive: bool = False, recompute: bool = True) -> TransformerEncoderLayer:
        """A continual layer over ``window`` tokens sharing ``layer``'s parameters."""
        att = layer.self_attn
        new = cls(att.embed_dim, att.num_heads, layer.linear1.out_features, 0.0,
                  layer.activation, layer.norm1.eps, att.batch_first, layer.norm_first,
                  bias=layer.linear1.bias is not None, device="meta", window=window,
                  query_index=query_index, retroactive=retroactive, recompute=recompute)
        for name in _LAYER_PARTS:
            setattr(new, name, getattr(layer, name))
        new.activation_relu_or_gelu = layer.activation_relu_or_gelu
        new.train(layer.training)
        return new

    def extra_repr(self) -> str:
        form = (f"retroactive, recompute={self.recompute}" if self.retroactive
                else f"query_index={self.query_index}")
        return f"window={self.window}, {form}, norm_first={self.norm_first}"

    # ------------------------------------------------------------------ block pieces
    def _ff(self, z: Tensor) -> Tensor:
        z = linear(z, self.linear1.weight, self.linear1.bias)
        return linear(self.activation(z), self.linear2.weight, self.linear2.bias)

    def _attn_in(self, x: Tensor) -> Tensor:
        return _norm(self.norm1, x)

    def _attn_out(self, x: Tensor, sa: Tensor) -> Tensor:
        if self.norm_first:
            y = x + sa
            return y + self._ff(_norm(self.norm2, y))
        y = _norm(self.norm1, x + sa)
        return _norm(self.norm2, y + self._ff(y))

    def _parts(self) -> ops.Parts:
        return ops.Parts(self.self_attn, self._attn_in if self.norm_first else None,
                         self._attn_out)

    def _dropouts(self) -> list[float]:
        return [self.self_attn.dropout, self.dropout.p, self.dropout1.p, self.dropout2.p]

    def _torch_forward(self, windows: Tensor) -> Tensor:
        """The torch layer on windows ``(N, n, d)``."""
        return seq_call(lambda w: nn.TransformerEncoderLayer.forward(self, w), windows,
                        self.self_attn.batch_first)

    # ------------------------------------------------------------------ window attention
    def _retroactive(self) -> bool:
        return self.retroactive

    def _window_output(self) -> bool:
        return self.retroactive

    def _keep_tokens(self) -> bool:
        return self.retroactive or self.query_index != self.window - 1

    def _reference(self, windows: Tensor) -> Tensor:
        return self._torch_forward(windows)


class TransformerEncoder(_WindowAttention, nn.TransformerEncoder):
    """Continual :class:`torch.nn.TransformerEncoder`: a stack of encoder layers over a window.

    Per step it returns the output at window position ``query_index`` of the torch encoder
    applied to the last ``window`` tokens. One layer steps as a single-output layer; with more
    layers the first is retroactive (all ``n`` window outputs updated), the middle ones recompute
    regular attention over the ``n`` updated tokens and the last is single-output.

    Args:
        encoder_layer: a :class:`TransformerEncoderLayer` or ``torch.nn`` layer, copied
            ``num_layers`` times (as torch does).
        num_layers: number of layers.
        norm: optional final normalisation (applied to the returned token).
        window: ``n``, the number of tokens attended over.
        query_index: window position whose output is returned (``-1``: the newest token).
        recompute: recompute the first layer's attention over the window each step (the
            default: exact at any score, ``2 n^2 d_h`` per head); ``False`` updates running
            softmax sums instead (the paper's ``O(n d_h)`` update, inexact and possibly NaN for
            sharply peaked attention; see :class:`RetroactiveMultiheadAttention`). Unused with
            one layer.

    Shape:
        clip ``(B, d, T)`` -> ``(B, d, T - n + 1)``; frame ``(B, d)`` -> ``(B, d)``.

    Example:
        >>> import torch, costream as cs
        >>> src = torch.nn.TransformerEncoder(
        ...     torch.nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True),
        ...     2).double().eval()
        >>> enc = cs.continual(src, temporal_window=6)
        >>> x = torch.randn(1, 16, 10, dtype=torch.double)
        >>> y = enc.forward_steps(x)  # one output per step once 6 tokens arrived
        >>> y.shape, torch.allclose(y, enc(x))
        (torch.Size([1, 16, 5]), True)
    """

    def __init__(self, encoder_layer: nn.TransformerEncoderLayer, num_layers: int,
                 norm: nn.Module | None = None, *, window: int, query_index: int = -1,
                 recompute: bool = True) -> None:
        if int(num_layers) < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        if not isinstance(encoder_layer, TransformerEncoderLayer):
            encoder_layer = TransformerEncoderLayer.from_torch(encoder_layer, window)
        layers = [copy.deepcopy(encoder_layer) for _ in range(int(num_layers))]
        nn.Module.__init__(self)
        self._setup(layers, norm, window, query_index, recompute)

    @classmethod
    def from_torch(cls, encoder: nn.TransformerEncoder, window: int, query_index: int = -1,
                   recompute: bool = True) -> TransformerEncoder:
        """A continual encoder over ``window`` tokens sharing ``encoder``'s parameters."""
        layers = [layer if isinstance(layer, TransformerEncoderLayer)
                  else TransformerEncoderLayer.from_torch(layer, window)
                  for layer in encoder.layers]
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new._setup(layers, encoder.norm, window, query_index, recompute)
        new.train(encoder.training)
        return new

    def _setup(self, layers: Sequence[TransformerEncoderLayer], norm: nn.Module | None,
               window: int, query_index: int, recompute: bool) -> None:
        self.window, self.query_index = _check_window(window, query_index)
        self.recompute = bool(recompute)
        last = len(layers) - 1
        for k, layer in enumerate(layers):  # the role each layer plays when stepped alone
            layer.window = self.window
            layer.retroactive = k == 0 and last > 0
            layer.query_index = self.query_index if k == last else self.window - 1
            layer.recompute = self.recompute
        self.layers = nn.ModuleList(layers)
        self.num_layers = len(layers)
        self.norm = norm
        self.enable_nested_tensor = self.use_nested_tensor = False
        self.mask_check = True

    def extra_repr(self) -> str:
        return f"window={self.window}, query_index={self.query_index}, recompute={self.recompute}"

    def _parts(self) -> ops.Parts:
        return self.layers[0]._parts()

    def _embed_dim(self) -> int:
        return self.layers[0].self_attn.embed_dim

    def _dropouts(self) -> list[float]:
        return [p for layer in self.layers for p in layer._dropouts()]

    def _retroactive(self) -> bool:
        return self.num_layers > 1

    def _keep_tokens(self) -> bool:
        return self.num_layers > 1 or self.query_index != self.window - 1

    def _head(self, y: Tensor) -> Tensor:
        if self.num_layers > 1:
            for layer in self.layers[1:-1]:
                y = ops.window_all(layer._parts(), y)
            y = ops.window_one(self.layers[-1]._parts(), y, self.query_index)
        return y if self.norm is None else _norm(self.norm, y)

    def _reference(self, windows: Tensor) -> Tensor:
        for layer in self.layers:
            windows = layer._torch_forward(windows)
        return windows if self.norm is None else self.norm(windows)
