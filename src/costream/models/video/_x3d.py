"""X3D (Feichtenhofer, CVPR 2020, arXiv 2004.04730) and CoX3D (Co3D, arXiv 2106.00050).

One network serves both: ``forward(clip)`` is the offline X3D computation and ``forward_step``
the continual one. With ``se_scope="clip"`` and a head pool over the whole clip it is the
published offline X3D, output for output (the PyTorchVideo / PySlowFast models with the same
weights). The continual CoX3D uses ``se_scope="frame"`` (SE pooled over space per frame) and a
head average pool that slides over the last ``head_pool`` frames, so every step yields a
prediction for the frames seen so far at the cost of one frame.

Temporal padding stays in the network: each depthwise 3x3x3 convolution delays the stream by one
frame (and the stem's 5x1x1 by two), so a prediction is due ``delay`` steps after the last frame
it covers, and a stepped stream equals the offline network run over the *whole* stream, which
differs from running it on each clip separately (clips padded at both ends).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any

from torch import nn

import costream as cs

from .._layers import (
    Network,
    TemporalFill,
    batch_norm,
    check_positive,
    classifier,
    conv3d,
    projection,
    residual_block,
)
from .._registry import register_model
from ._se import SEScope, SqueezeExcitation, round_width

# size: (clip_length, crop_size, depth_factor); widths are shared (X3D paper, table 1)
_SIZES = {"xs": (4, 160, 2.2), "s": (13, 160, 2.2), "m": (16, 224, 2.2), "l": (16, 312, 5.0)}
_STAGE_OUT = (24, 48, 96, 192)
_BASE_DEPTHS = (1, 2, 5, 3)
_STEM_WIDTH = 24
_INNER_FACTOR = 2.25
_SE_RATIO = 1 / 16
_HEAD_INNER = 432
_HEAD_OUT = 2048


class X3D(Network):
    """X3D-XS/S/M/L as a continual network: ``stem``, ``res2`` ... ``res5``, ``head``.

    Args:
        size: ``"xs"``, ``"s"``, ``"m"`` or ``"l"``.
        num_classes: outputs of the classifier.
        clip_length: frames of the offline clip (default: 4 for XS, 13 for S, 16 for M and L);
            the head pools over this many frames unless ``head_pool`` is given.
        crop_size: input height and width (default 160/160/224/312); the network adapts to any
            size (the head pools space globally), this sets ``input_shape``.
        head_pool: frames the head averages over (a sliding window when stepping); e.g. 64 for
            the extended receptive field of CoX3D-S64, at the same cost per step.
        se_scope: ``"clip"`` (offline original; cannot be stepped) or ``"frame"`` (streams).
        temporal_fill: ``"zeros"`` or ``"replicate"``: the temporal padding of every conv.
        head_activation: ``"softmax"`` (as PyTorchVideo's X3D), ``"sigmoid"`` or ``None``.
        dropout: dropout before the classifier (training only).
        res2_shortcut_bn: batch norm on res2's projection shortcut (PySlowFast's X3D has it;
            PyTorchVideo's omits it, as res2 keeps 24 channels). ``create_model`` with a
            checkpoint picks the variant the checkpoint holds.

    Shape:
        clip ``(B, 3, T, H, W)`` -> ``(B, num_classes, T - head_pool + 1)``; frame
        ``(B, 3, H, W)`` -> ``(B, num_classes)`` once due.

    Example:
        >>> import torch
        >>> from costream.models import X3D
        >>> net = X3D("xs", num_classes=5, se_scope="frame", head_pool=2).eval()
        >>> net.temporal.receptive_field, net.delay
        (58, 29)
        >>> net(torch.randn(1, 3, 4, 32, 32)).shape  # 4 frames, head window 2: 3 predictions
        torch.Size([1, 5, 3])
    """

    def __init__(self, size: str = "s", *, num_classes: int = 400, clip_length: int | None = None,
                 crop_size: int | None = None, head_pool: int | None = None,
                 se_scope: SEScope = "clip", temporal_fill: TemporalFill = "zeros",
                 head_activation: str | None = "softmax", dropout: float = 0.5,
                 res2_shortcut_bn: bool = True) -> None:
        if size not in _SIZES:
            raise ValueError(f"X3D size must be one of {sorted(_SIZES)}, got {size!r}")
        t_default, s_default, depth = _SIZES[size]
        clip_length = check_positive("clip_length", clip_length or t_default)
        head_pool = check_positive("head_pool", head_pool or clip_length)
        fill = temporal_fill
        stem = cs.Sequential(OrderedDict(
            conv_s=conv3d(3, _STEM_WIDTH, (1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1)),
            conv_t=conv3d(_STEM_WIDTH, _STEM_WIDTH, (5, 1, 1), padding=(2, 0, 0),
                          groups=_STEM_WIDTH, fill=fill),
            bn=batch_norm(_STEM_WIDTH),
            act=nn.ReLU(inplace=True),
        ))
        layers: list[tuple[str, nn.Module]] = [("stem", stem)]
        c_in = _STEM_WIDTH
        for i, (c_out, base) in enumerate(zip(_STAGE_OUT, _BASE_DEPTHS)):
            blocks = [_block(c_in if j == 0 else c_out, c_out, 2 if j == 0 else 1,
                             se=j % 2 == 0, se_scope=se_scope, fill=fill,
                             shortcut_bn=res2_shortcut_bn or c_in != c_out)
                      for j in range(math.ceil(depth * base))]
            layers.append((f"res{i + 2}", cs.Sequential(*blocks)))
            c_in = c_out
        head = cs.Sequential(OrderedDict([
            ("conv", conv3d(c_in, _HEAD_INNER, 1)),
            ("bn", batch_norm(_HEAD_INNER)),
            ("act", nn.ReLU(inplace=True)),
            ("pool", cs.AdaptiveAvgPool3d((1, 1, 1), window=head_pool)),
            ("fc", conv3d(_HEAD_INNER, _HEAD_OUT, 1)),
            ("fc_act", nn.ReLU(inplace=True)),
            *classifier(_HEAD_OUT, num_classes, dropout, head_activation),
        ]))
        layers.append(("head", head))
        super().__init__(OrderedDict(layers))
        self.size = size
        self.num_classes = num_classes
        self.clip_length = clip_length
        self.crop_size = crop_size or s_default
        self.head_pool = head_pool
        self.se_scope = se_scope
        self.temporal_fill = temporal_fill
        self.res2_shortcut_bn = res2_shortcut_bn

    @property
    def streamable(self) -> bool:
        """Whether ``forward_step`` can run (``se_scope="frame"``)."""
        return self.se_scope == "frame"

    @property
    def input_shape(self) -> tuple[int, int, int, int]:
        """``(C, T, H, W)`` of the clip this configuration was published for."""
        return (3, self.clip_length, self.crop_size, self.crop_size)

    def extra_repr(self) -> str:
        return (f"size={self.size!r}, se_scope={self.se_scope!r}, head_pool={self.head_pool}, "
                f"temporal_fill={self.temporal_fill!r}")


def _block(c_in: int, c_out: int, stride: int, *, se: bool, se_scope: SEScope,
           fill: TemporalFill, shortcut_bn: bool) -> cs.Sequential:
    """X3D bottleneck: 1x1x1, depthwise 3x3x3 (+ SE), Swish, 1x1x1; projection when reshaping."""
    inner = int(_INNER_FACTOR * c_out)
    main: list[tuple[str, nn.Module]] = [
        ("conv_a", conv3d(c_in, inner, 1)),
        ("bn_a", batch_norm(inner)),
        ("act_a", nn.ReLU(inplace=True)),
        ("conv_b", conv3d(inner, inner, 3, stride=(1, stride, stride), padding=1, groups=inner,
                          fill=fill)),
        ("bn_b", batch_norm(inner)),
    ]
    if se:
        main.append(("se", SqueezeExcitation(inner, round_width(inner, _SE_RATIO), se_scope)))
    main += [
        ("act_b", nn.SiLU(inplace=True)),
        ("conv_c", conv3d(inner, c_out, 1)),
        ("bn_c", batch_norm(c_out)),
    ]
    shortcut = (projection(c_in, c_out, stride, bn=shortcut_bn)
                if (c_in != c_out or stride != 1) else None)
    return residual_block(cs.Sequential(OrderedDict(main)), shortcut)


def _x3d(size: str, default_scope: SEScope, **kwargs: Any) -> X3D:
    kwargs.setdefault("se_scope", default_scope)
    return X3D(size, **kwargs)


@register_model
def x3d_xs(**kwargs: Any) -> X3D:
    """X3D-XS, offline original: 4x160x160 clips, clip-scope SE, head pool over the clip."""
    return _x3d("xs", "clip", **kwargs)


@register_model
def x3d_s(**kwargs: Any) -> X3D:
    """X3D-S, offline original: 13x160x160 clips, clip-scope SE, head pool over the clip."""
    return _x3d("s", "clip", **kwargs)


@register_model
def x3d_m(**kwargs: Any) -> X3D:
    """X3D-M, offline original: 16x224x224 clips, clip-scope SE, head pool over the clip."""
    return _x3d("m", "clip", **kwargs)


@register_model
def x3d_l(**kwargs: Any) -> X3D:
    """X3D-L, offline original: 16x312x312 clips, clip-scope SE, head pool over the clip."""
    return _x3d("l", "clip", **kwargs)


@register_model
def cox3d_xs(**kwargs: Any) -> X3D:
    """CoX3D-XS: continual X3D-XS (frame-scope SE, sliding head pool, default 4 frames)."""
    return _x3d("xs", "frame", **kwargs)


@register_model
def cox3d_s(**kwargs: Any) -> X3D:
    """CoX3D-S: continual X3D-S (frame-scope SE, sliding head pool, default 13 frames)."""
    return _x3d("s", "frame", **kwargs)


@register_model
def cox3d_m(**kwargs: Any) -> X3D:
    """CoX3D-M: continual X3D-M (frame-scope SE, sliding head pool, default 16 frames)."""
    return _x3d("m", "frame", **kwargs)


@register_model
def cox3d_l(**kwargs: Any) -> X3D:
    """CoX3D-L: continual X3D-L (frame-scope SE, sliding head pool, default 16 frames)."""
    return _x3d("l", "frame", **kwargs)
