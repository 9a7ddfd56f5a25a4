"""OadTR (Wang et al., ICCV 2021, arXiv 2106.11149) and CoOadTR (Continual Transformers,
Hedegaard et al., ICLR 2023, arXiv 2201.06268) for online action detection on feature streams.

Both read a stream of per-frame feature vectors (THUMOS14: 4096-d Kinetics TSN features, rgb 2048
+ flow 2048, or 3072-d ActivityNet ones) and predict, at every step, the action of the newest
frame from the last ``window`` (64) features. Streams are ``(B, C, T)`` clips and ``(B, C)``
frames, as everywhere in costream.

* :class:`OadTR` is the offline baseline: every step it recomputes the whole window (a linear
  embedding, a class token, a learned positional encoding, a 3-layer pre-norm encoder and a
  5-layer decoder over 8 learned queries), as OadTR does. Its state is the last ``window - 1``
  features.
* :class:`CoOadTR` is the continual model: linear embedding, recycling positional encoding,
  a continual post-norm encoder of one single-output layer (b1) or a retroactive layer followed
  by a single-output layer (b2), a final layer norm and a linear classifier on the newest
  token; no class token, no decoder.

Per-step MACs and parameters, and how they follow from the layer sizes: see :class:`CoOadTR`.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
from torch import Tensor, nn

import costream as cs

from ...core._module import Age, CoModule, advance
from ...core._temporal import Temporal
from .._layers import Network, check_positive
from .._registry import register_model


def _check_width(name: str, value: int, heads: int) -> int:
    value = check_positive(name, value)
    if value % heads:
        raise ValueError(f"{name}={value} must be divisible by the number of heads ({heads})")
    return value


class CoOadTR(Network):
    """CoOadTR: a continual Transformer for online action detection (arXiv 2201.06268).

    Children: ``embed`` (linear ``in_features -> embed_dim`` per frame), ``pos``
    (:class:`costream.RecyclingPositionalEncoding`: the token at stream step ``t`` gets position
    ``t mod num_positions``), ``drop``, ``encoder`` (:class:`costream.TransformerEncoder` of
    post-norm GELU layers over the last ``window`` tokens, followed by a layer norm) and
    ``head`` (linear classifier). Per step the prediction is the encoder's output for the
    newest token.

    ``forward`` on a stream is the offline counterpart of stepping: the positional encoding is
    applied along the *whole* stream (positions recycle every ``num_positions`` frames), then
    the encoder runs over every window of ``window`` consecutive tokens. A window starting at
    stream step ``s`` therefore carries positions ``s .. s + window - 1`` (mod
    ``num_positions``), not ``0 .. window - 1`` as a plain window encoder would: stepping and
    ``forward`` compute exactly this, so they agree.

    Args:
        num_layers: 1 (CoOadTR-b1: one single-output layer) or 2 (b2: a retroactive layer,
            then a single-output one); more layers put regular layers in between.
        in_features: ``C``, the width of a feature frame (4096 Kinetics, 3072 ActivityNet).
        num_classes: classes predicted per frame (22 on THUMOS14, background included).
        window: ``n``, the number of frames attended over.
        embed_dim: ``d``, the token width.
        num_heads: attention heads.
        mlp_dim: width of the feed-forward block.
        dropout: dropout after the positional encoding and inside the layers (training only).
        num_positions: ``K``, positions before they recycle (default ``window``).
        learned_positions: a learned table (default) or the fixed sinusoidal one.
        recompute: recompute the retroactive layer's attention from cached queries, keys and
            values each step (the default: exact at any score); ``False`` selects the paper's
            running-sum update (cheaper by ``h (2 n^2 d_h - 7 n d_h)``, inexact and possibly NaN
            for sharply peaked attention; see :class:`costream.RetroactiveMultiheadAttention`).

    Shape:
        clip ``(B, in_features, T)`` -> ``(B, num_classes, T - window + 1)``; frame
        ``(B, in_features)`` -> ``(B, num_classes)`` from step ``window - 1`` on.

    Cost per step (ptflops-convention MACs, counted on ``meta`` tensors by the tests), with
    ``C = 4096`` features, ``d = 1024``, ``h = 8`` heads of ``d_h = 128``, MLP ``m = 1024``,
    ``n = 64`` tokens, 22 classes:

    - embedding ``C d + d`` = 4.20 M;
    - single-output layer: q, k, v of the new token ``3 (d^2 + d)`` = 3.15 M; attention
      ``h (2 n d_h + 2 d_h)`` = 0.13 M; out projection and feed-forward of one token
      ``d^2 + d + 2 d m + m + d`` = 3.15 M;
    - b1 in all, with norms, element-wise ops and the classifier: **10.72 M** (paper 10.6);
    - b2's retroactive layer: q, k, v of the new token 3.15 M; attention recomputed over the
      window ``h (2 n^2 d_h + 2 n d_h)`` = 8.52 M (the paper's running-sum update,
      ``recompute=False``: ``h (7 n d_h + 2 n - 3 d_h)`` = 0.46 M); out projection and
      feed-forward of all ``n``
      tokens ``n (d^2 + d + 2 d m + m + d)`` = 201.5 M; its single-output layer then needs
      keys and values of all ``n`` updated tokens ``2 n (d^2 + d)`` = 134.3 M, plus the
      newest token's query, attention, out projection and feed-forward, 4.3 M;
    - b2 in all: **356.7 M** (``recompute=False``: 348.6 M). The paper's 411.9 M is consistent
      with the running-sum update plus projecting the queries of the 63 older tokens in the
      second layer (``63 (d^2 + d)`` = 66.1 M more), which the output does not use.

    Parameter counts: b1 10.59 M (paper 10.5), b2 16.89 M (paper 16.8). 3072-d features: 9.67 and
    355.6 MMACs per step (``recompute=False``: 347.6; paper 9.6 and 410.8).

    Example:
        >>> import torch
        >>> from costream.models import CoOadTR
        >>> net = CoOadTR(2, in_features=12, num_classes=5, window=4, embed_dim=8, num_heads=2,
        ...               mlp_dim=16).double().eval()
        >>> x = torch.randn(1, 12, 10, dtype=torch.double)
        >>> steps = [net.forward_step(x[:, :, t]) for t in range(10)]
        >>> steps[2] is None, torch.allclose(torch.stack(steps[3:], 2), net(x))
        (True, True)
    """

    def __init__(self, num_layers: int = 1, *, in_features: int = 4096, num_classes: int = 22,
                 window: int = 64, embed_dim: int = 1024, num_heads: int = 8,
                 mlp_dim: int = 1024, dropout: float = 0.1, num_positions: int | None = None,
                 learned_positions: bool = True, recompute: bool = True) -> None:
        num_layers = check_positive("num_layers", num_layers)
        window = check_positive("window", window)
        embed_dim = _check_width("embed_dim", embed_dim, check_positive("num_heads", num_heads))
        num_positions = check_positive("num_positions", num_positions or window)
        layer = cs.TransformerEncoderLayer(
            embed_dim, num_heads, check_positive("mlp_dim", mlp_dim), dropout,
            activation="gelu", batch_first=True, norm_first=False, window=window)
        super().__init__(OrderedDict(
            embed=cs.Linear(check_positive("in_features", in_features), embed_dim),
            pos=cs.RecyclingPositionalEncoding(embed_dim, num_positions,
                                               learned=learned_positions),
            drop=nn.Dropout(dropout),
            encoder=cs.TransformerEncoder(layer, num_layers, nn.LayerNorm(embed_dim),
                                          window=window, recompute=recompute),
            head=cs.Linear(embed_dim, check_positive("num_classes", num_classes)),
        ))
        self.num_layers, self.in_features, self.num_classes = num_layers, in_features, num_classes
        self.window, self.embed_dim = window, embed_dim

    @property
    def input_shape(self) -> tuple[int, int]:
        """``(C, T)`` of the shortest clip with one prediction: one window of features."""
        return (self.in_features, self.window)

    def extra_repr(self) -> str:
        return f"num_layers={self.num_layers}, window={self.window}"

    def _clip(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[1] != self.in_features:
            raise ValueError(f"CoOadTR.forward expects a clip (B, {self.in_features}, T), got "
                             f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
        return super()._clip(x)


class OadTR(CoModule):
    """OadTR, the offline window model: each step recomputes the last ``window`` features.

    Per window of ``n`` features: linear embedding to ``embed_dim``, a class token appended
    after the newest token, a learned positional encoding over the ``n + 1`` tokens, dropout, a
    pre-norm GELU encoder (``torch.nn.TransformerEncoder``) with a final layer norm, and a
    post-norm decoder (``torch.nn.TransformerDecoder``, ReLU) whose ``num_queries`` learned
    queries attend to the encoded tokens. The prediction is a linear classifier on the class
    token's output concatenated with the mean of the decoder outputs. (OadTR also classifies
    each decoder output to anticipate future actions during training; that auxiliary output is
    not part of the per-frame prediction and is left out.)

    The state is the last ``window - 1`` features; stepping is the sliding-window recompute that
    CoOadTR avoids, and ``forward`` on a stream runs the same window computation on every window.
    A step costs 2549.5 MMACs with 4096-d features (paper: 2513.5, a count that includes the
    decoder; without it a window costs 1524.5 MMACs); 75.7 M parameters.

    Args:
        in_features: ``C``, the width of a feature frame.
        num_classes: classes predicted per frame.
        window: ``n``, frames per window.
        embed_dim: encoder and decoder width.
        num_heads: encoder attention heads.
        mlp_dim: encoder feed-forward width.
        num_layers: encoder layers.
        decoder_layers: decoder layers (0: encoder only).
        decoder_heads: decoder attention heads.
        decoder_mlp_dim: decoder feed-forward width.
        num_queries: learned decoder queries.
        dropout: dropout (training only).

    Shape:
        clip ``(B, in_features, T)`` -> ``(B, num_classes, T - window + 1)``; frame
        ``(B, in_features)`` -> ``(B, num_classes)`` from step ``window - 1`` on.

    Example:
        >>> import torch
        >>> from costream.models import OadTR
        >>> net = OadTR(in_features=12, num_classes=5, window=4, embed_dim=8, num_heads=2,
        ...             mlp_dim=16, num_layers=1, decoder_layers=1, decoder_heads=2,
        ...             decoder_mlp_dim=16, num_queries=2).double().eval()
        >>> x = torch.randn(1, 12, 7, dtype=torch.double)
        >>> torch.allclose(net.forward_steps(x), net(x))  # steps 3..6: four windows
        True
    """

    def __init__(self, *, in_features: int = 4096, num_classes: int = 22, window: int = 64,
                 embed_dim: int = 1024, num_heads: int = 8, mlp_dim: int = 1024,
                 num_layers: int = 3, decoder_layers: int = 5, decoder_heads: int = 4,
                 decoder_mlp_dim: int = 1024, num_queries: int = 8,
                 dropout: float = 0.1) -> None:
        super().__init__()
        self.in_features = check_positive("in_features", in_features)
        self.num_classes = check_positive("num_classes", num_classes)
        self.window = check_positive("window", window)
        d = _check_width("embed_dim", embed_dim, check_positive("num_heads", num_heads))
        self.embed_dim = d
        self.embed = nn.Linear(in_features, d)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos = nn.Parameter(torch.empty(1, window + 1, d).normal_(std=0.02))
        self.drop = nn.Dropout(dropout)
        layer = nn.TransformerEncoderLayer(d, num_heads, check_positive("mlp_dim", mlp_dim),
                                           dropout, activation="gelu", batch_first=True,
                                           norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, check_positive("num_layers", num_layers),
                                             nn.LayerNorm(d), enable_nested_tensor=False)
        self.decoder: nn.TransformerDecoder | None = None
        if decoder_layers:
            _check_width("embed_dim", d, check_positive("decoder_heads", decoder_heads))
            dec = nn.TransformerDecoderLayer(d, decoder_heads,
                                             check_positive("decoder_mlp_dim", decoder_mlp_dim),
                                             dropout, batch_first=True)
            self.queries = nn.Parameter(
                torch.zeros(1, check_positive("num_queries", num_queries), d))
            self.decoder = nn.TransformerDecoder(dec, check_positive("decoder_layers",
                                                                     decoder_layers),
                                                 nn.LayerNorm(d))
        self.head = nn.Linear(2 * d if self.decoder is not None else d, num_classes)

    @property
    def input_shape(self) -> tuple[int, int]:
        """``(C, T)`` of one window of features."""
        return (self.in_features, self.window)

    def extra_repr(self) -> str:
        return f"window={self.window}"

    def classify(self, windows: Tensor) -> Tensor:
        """The prediction for each window ``(N, window, in_features)``: ``(N, num_classes)``."""
        n = windows.shape[0]
        x = torch.cat((self.embed(windows), self.cls_token.expand(n, -1, -1)), 1)
        x = self.encoder(self.drop(x + self.pos))
        token = x[:, -1]
        if self.decoder is None:
            return self.head(token)
        dec = self.drop(self.decoder(self.queries.expand(n, -1, -1), x))
        return self.head(torch.cat((token, dec.mean(1)), 1))

    # ------------------------------------------------------------------ CoModule
    def _temporal(self) -> Temporal:
        return Temporal(self.window, 1, 0, 0)

    def _input_spec(self) -> tuple[int | None, int | None]:
        return 2, self.in_features

    def _init(self, batch: int, shape: Any, device: torch.device, dtype: torch.dtype):
        if tuple(shape) != (self.in_features,):
            raise ValueError(f"OadTR expects feature frames (B, {self.in_features}), got frames "
                             f"of shape {tuple(shape)}")
        return {"x": torch.zeros(batch, self.window - 1, self.in_features, device=device,
                                 dtype=dtype)}, (self.num_classes,)

    def _step(self, x: Tensor, state: dict, age: Age, phase: int):
        win = torch.cat((state["x"], x.unsqueeze(1)), 1)
        out_age, out_phase = advance(age, phase, self.window - 1, 1)
        new = {"x": win[:, 1:]}
        if isinstance(out_age, int) and out_age < 0:
            return None, new, None, 0
        return self.classify(win), new, out_age, out_phase

    def _steps(self, x: Tensor, state: dict, age: Age, phase: int):
        if isinstance(age, Tensor):
            return super()._steps(x, state, age, phase)
        b, _, t = x.shape
        n = self.window
        seq = torch.cat((state["x"], x.transpose(1, 2)), 1)  # (B, n - 1 + T, C)
        new = {"x": seq[:, t:].contiguous()}
        first = 0 if age is None else min(t, max(0, n - 1 - age))
        if first >= t:
            return None, new, None, 0
        y = self._windows(seq[:, first:], b)
        out_age, out_phase = advance(None if age is None else age + first, phase + first,
                                     n - 1, 1)
        return y, new, out_age, out_phase

    def _windows(self, seq: Tensor, b: int) -> Tensor:
        """Predictions ``(B, classes, T')`` for every window of ``seq`` ``(B, T' + n - 1, C)``."""
        n = self.window
        tp = seq.shape[1] - n + 1
        windows = seq.unfold(1, n, 1).transpose(2, 3).reshape(b * tp, n, -1)
        return self.classify(windows).reshape(b, tp, -1).transpose(1, 2)

    def _clip(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[1] != self.in_features:
            raise ValueError(f"OadTR.forward expects a clip (B, {self.in_features}, T), got "
                             f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
        b, _, t = x.shape
        if t < self.window:
            return x.new_zeros(b, self.num_classes, 0)
        return self._windows(x.transpose(1, 2), b)


@register_model(family="features")
def oadtr(**kwargs: Any) -> OadTR:
    """OadTR (offline window baseline): 64 x 4096-d features, 3 encoder + 5 decoder layers."""
    return OadTR(**kwargs)


@register_model(family="features")
def cooadtr_b1(**kwargs: Any) -> CoOadTR:
    """CoOadTR-b1: one single-output encoder layer over 64 x 4096-d features."""
    return CoOadTR(1, **kwargs)


@register_model(family="features")
def cooadtr_b2(**kwargs: Any) -> CoOadTR:
    """CoOadTR-b2: a retroactive then a single-output encoder layer over 64 x 4096-d features."""
    return CoOadTR(2, **kwargs)
