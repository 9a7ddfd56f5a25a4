"""3D ResNet-50s: Slow-8x8 (SlowFast, arXiv 1812.03982) and I3D (arXiv 1705.07750), offline and
continual (CoSlow, CoI3D; Co3D, arXiv 2106.00050).

As for X3D, one network serves both: ``forward(clip)`` is the offline computation (identical to
PyTorchVideo's ``slow_r50`` / ``i3d_r50`` with the same weights when the head pools the whole
clip), ``forward_step`` the continual one, with the head average pool sliding over the last
``head_pool`` (temporally pooled) frames. I3D's temporal max pool (kernel 2, stride 2) after res2
makes the continual I3D emit a prediction every second frame.
"""

from __future__ import annotations

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

_DEPTHS = (3, 4, 6, 3)
_INNER = (64, 128, 256, 512)
_OUT = (256, 512, 1024, 2048)
# arch: stem temporal kernel, conv_a temporal kernels per stage (cycled over blocks), temporal
# max pool after res2, clip length, crop size
_ARCHS: dict[str, dict[str, Any]] = {
    "slow_r50": {"stem_t": 1, "conv_a": ((1,), (1,), (3,), (3,)), "pool2": False,
                 "clip_length": 8, "crop_size": 256},
    "i3d_r50": {"stem_t": 5, "conv_a": ((3,), (3, 1), (3, 1), (1, 3)), "pool2": True,
                "clip_length": 8, "crop_size": 224},
}


class ResNet3D(Network):
    """A 3D ResNet-50 as a continual network: ``stem``, ``res2`` ... ``res5``, ``head``.

    Args:
        arch: ``"slow_r50"`` or ``"i3d_r50"``.
        num_classes: outputs of the classifier.
        clip_length: frames of the offline clip (default 8); the head pools over all of them
            (after I3D's temporal pooling: 4) unless ``head_pool`` is given.
        crop_size: input height and width (default 256 for Slow, 224 for I3D); the network
            adapts to any size (the head pools space globally), this sets ``input_shape``.
        head_pool: frames (at the head's temporal resolution) the head averages over, a
            sliding window when stepping; e.g. 64 for CoSlow64.
        temporal_fill: ``"zeros"`` or ``"replicate"``: the temporal padding of every conv.
        head_activation: ``None`` (logits, as PyTorchVideo), ``"softmax"`` or ``"sigmoid"``.
        dropout: dropout before the classifier (training only).

    Shape:
        clip ``(B, 3, T, H, W)`` -> ``(B, num_classes, T' - head_pool + 1)`` with ``T' = T``
        (Slow) or ``T // 2`` (I3D); frame ``(B, 3, H, W)`` -> ``(B, num_classes)`` once due.

    Example:
        >>> import torch
        >>> from costream.models import ResNet3D
        >>> net = ResNet3D("i3d_r50", num_classes=5, head_pool=1).eval()
        >>> net.temporal.stride, net.delay  # one prediction every second frame
        (2, 18)
        >>> net(torch.randn(1, 3, 8, 32, 32)).shape
        torch.Size([1, 5, 4])
    """

    def __init__(self, arch: str = "slow_r50", *, num_classes: int = 400,
                 clip_length: int | None = None, crop_size: int | None = None,
                 head_pool: int | None = None, temporal_fill: TemporalFill = "zeros",
                 head_activation: str | None = None, dropout: float = 0.5) -> None:
        if arch not in _ARCHS:
            raise ValueError(f"ResNet3D arch must be one of {sorted(_ARCHS)}, got {arch!r}")
        cfg = _ARCHS[arch]
        clip_length = check_positive("clip_length", clip_length or cfg["clip_length"])
        t_stride = 2 if cfg["pool2"] else 1
        head_pool = check_positive("head_pool", head_pool or max(1, clip_length // t_stride))
        kt = cfg["stem_t"]
        stem = cs.Sequential(OrderedDict(
            conv=conv3d(3, 64, (kt, 7, 7), stride=(1, 2, 2), padding=(kt // 2, 3, 3),
                        fill=temporal_fill),
            bn=batch_norm(64),
            act=nn.ReLU(inplace=True),
            pool=cs.MaxPool3d((1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1)),
        ))
        layers: list[tuple[str, nn.Module]] = [("stem", stem)]
        c_in = 64
        for i, (depth, inner, c_out, kernels) in enumerate(
                zip(_DEPTHS, _INNER, _OUT, cfg["conv_a"])):
            blocks = [_bottleneck(c_in if j == 0 else c_out, inner, c_out,
                                  2 if (i > 0 and j == 0) else 1, kernels[j % len(kernels)],
                                  temporal_fill) for j in range(depth)]
            layers.append((f"res{i + 2}", cs.Sequential(*blocks)))
            if i == 0 and cfg["pool2"]:
                layers.append(("pool2", cs.MaxPool3d((2, 1, 1), stride=(2, 1, 1))))
            c_in = c_out
        head = cs.Sequential(OrderedDict([
            ("pool", cs.AdaptiveAvgPool3d((1, 1, 1), window=head_pool)),
            *classifier(c_in, num_classes, dropout, head_activation),
        ]))
        layers.append(("head", head))
        super().__init__(OrderedDict(layers))
        self.arch = arch
        self.num_classes = num_classes
        self.clip_length = clip_length
        self.crop_size = crop_size or cfg["crop_size"]
        self.head_pool = head_pool
        self.temporal_fill = temporal_fill

    @property
    def streamable(self) -> bool:
        """Whether ``forward_step`` can run (always, for these networks)."""
        return True

    @property
    def input_shape(self) -> tuple[int, int, int, int]:
        """``(C, T, H, W)`` of the clip this configuration was published for."""
        return (3, self.clip_length, self.crop_size, self.crop_size)

    def extra_repr(self) -> str:
        return (f"arch={self.arch!r}, head_pool={self.head_pool}, "
                f"temporal_fill={self.temporal_fill!r}")


def _bottleneck(c_in: int, inner: int, c_out: int, stride: int, kt: int,
                fill: TemporalFill) -> cs.Sequential:
    """ResNet bottleneck: kt x1x1, 1x3x3 (spatial stride), 1x1x1; projection when reshaping."""
    main = cs.Sequential(OrderedDict(
        conv_a=conv3d(c_in, inner, (kt, 1, 1), padding=(kt // 2, 0, 0), fill=fill),
        bn_a=batch_norm(inner),
        act_a=nn.ReLU(inplace=True),
        conv_b=conv3d(inner, inner, (1, 3, 3), stride=(1, stride, stride), padding=(0, 1, 1)),
        bn_b=batch_norm(inner),
        act_b=nn.ReLU(inplace=True),
        conv_c=conv3d(inner, c_out, 1),
        bn_c=batch_norm(c_out),
    ))
    shortcut = projection(c_in, c_out, stride) if (c_in != c_out or stride != 1) else None
    return residual_block(main, shortcut)


@register_model
def slow_r50(**kwargs: Any) -> ResNet3D:
    """Slow-8x8-R50, offline: 8x256x256 clips, head pool over the 8 frames."""
    return ResNet3D("slow_r50", **kwargs)


@register_model
def coslow_r50(**kwargs: Any) -> ResNet3D:
    """CoSlow-8x8-R50: continual Slow (sliding head pool, default 8 frames; 64 for CoSlow64)."""
    return ResNet3D("slow_r50", **kwargs)


@register_model
def i3d_r50(**kwargs: Any) -> ResNet3D:
    """I3D-R50, offline: 8x224x224 clips, head pool over the 4 temporally pooled frames."""
    return ResNet3D("i3d_r50", **kwargs)


@register_model
def coi3d_r50(**kwargs: Any) -> ResNet3D:
    """CoI3D-R50: continual I3D (prediction every 2nd frame; sliding head pool, default 4)."""
    return ResNet3D("i3d_r50", **kwargs)
