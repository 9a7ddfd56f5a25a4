"""ST-GCN, AGCN and S-TR and their continual versions (CoST-GCN, CoAGCN, CoS-TR; Hedegaard,
Heidari & Iosifidis, "Continual Spatio-Temporal Graph Convolutional Networks", arXiv
2203.11009).

One network serves both modes, as for the video zoo: ``forward`` runs a skeleton clip
``(N, C, T, V, M)`` offline, ``forward_step`` a stream frame by frame (frames ``(N, C, V, M)``).
Ten blocks (widths 64, 64, 64, 64, 128, 128, 128, 256, 256, 256) each apply a per-frame graph
layer (graph convolution, adaptive graph convolution or spatial self-attention) and a temporal
convolution (kernel 9) with a residual connection; the head averages over joints and persons
per frame and over a window of frames, then classifies.

Two temporal configurations:

* **strided** (ST-GCN, AGCN, S-TR and CoST-GCN, CoAGCN, CoS-TR): temporal stride 2 in blocks 5
  and 8 and temporal padding 4 in every temporal convolution, as published. The continual
  network predicts once every 4 frames; stepped over a stream it returns what ``forward``
  returns on the whole stream (padded at the stream's start).
* **star** (CoST-GCN*, CoAGCN*, CoS-TR*): stride 1 and no temporal padding; the residual of a
  block is cropped to the centre of its temporal convolution's window. The network predicts
  every frame, and each prediction equals ``forward`` on the ``clip_length`` frames it covers
  (300 by default: 80 frames for the convolutions, 220 averaged by the head).

AGCN's data-dependent adjacency spans the whole clip in the published network
(``adjacency_scope="clip"``, the offline ``agcn``; it cannot be stepped); CoAGCN computes it
from each frame (``"frame"``), which streams exactly but approximates AGCN: the continual
versions are exact with respect to their own offline counterpart (the same module's
``forward``), not to the clip-scope AGCN.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Literal

from torch import nn

import costream as cs

from .._layers import Network, check_positive
from .._registry import register_model
from ._graphs import SkeletonGraph, skeleton_graph
from ._stgcn_layers import (
    AdaptiveGraphConv,
    AdjacencyScope,
    GraphConv,
    SkeletonInputNorm,
    SpatialAttention,
    SpatioTemporalBlock,
)
from ._stgcn_linear import TemporalConv

Arch = Literal["st_gcn", "agcn", "s_tr"]
_ARCHS = ("st_gcn", "agcn", "s_tr")
# (output width as a multiple of `width`, temporal stride) of the ten blocks
_BLOCKS = ((1, 1), (1, 1), (1, 1), (1, 1), (2, 2), (2, 1), (2, 1), (4, 2), (4, 1), (4, 1))
_KERNEL = 9
_ATTENTION_FROM = 3  # S-TR: blocks 4-10 (0-based 3-9) use spatial self-attention
_DEFAULT_CLASSES = {"ntu": 60, "kinetics": 400}


class STGCN(Network):
    """The ST-GCN family as a continual network: ``data_bn``, ``layers``, ``pool``, ``fc``.

    Args:
        arch: ``"st_gcn"`` (graph convolutions with learnable edge importance), ``"agcn"``
            (adaptive graph convolutions) or ``"s_tr"`` (spatial self-attention in blocks
            4-10).
        num_classes: outputs of the classifier (default: 60 for NTU RGB+D, 400 for Kinetics).
        graph: ``"ntu"`` (25 joints), ``"kinetics"`` (18 joints) or a
            :class:`~costream.models.SkeletonGraph`.
        in_channels: coordinates per joint (3: x, y, z for NTU; x, y, confidence for Kinetics).
        num_persons: persons per frame ``M`` (2 in both datasets' published layouts).
        clip_length: frames of the offline clip (default 300); the head averages over all the
            frames the convolutions leave of it unless ``head_pool`` is given.
        head_pool: frames (after the temporal strides) the head averages over: a sliding
            window when stepping.
        star: the paper's * configuration: every temporal stride 1 and no temporal padding
            (a prediction per frame, each equal to ``forward`` on its own ``clip_length``
            frames); ``False`` keeps the published strides and padding.
        adjacency_scope: AGCN only: ``"clip"`` (published AGCN, cannot be stepped) or
            ``"frame"`` (CoAGCN).
        width: width of blocks 1-4 (64); blocks 5-7 have twice, 8-10 four times as many
            channels. Smaller widths make small test networks.
        heads: S-TR only: attention heads (8).
        head_activation: ``None`` (logits, as published), ``"softmax"`` or ``"sigmoid"``.

    Shape:
        clip ``(N, C, T, V, M)`` -> ``(N, num_classes, T')``; frame ``(N, C, V, M)`` ->
        ``(N, num_classes)`` once due (every 4th frame when strided, every frame when ``star``).

    Example:
        >>> import torch
        >>> from costream.models import STGCN
        >>> net = STGCN("st_gcn", num_classes=5, width=8, clip_length=84, star=True).eval()
        >>> net.receptive_field, net.temporal.stride, net.head_pool  # 80 conv frames + 4
        (84, 1, 4)
        >>> net(torch.randn(1, 3, 84, 25, 2)).shape  # exactly one clip: one prediction
        torch.Size([1, 5, 1])
    """

    def __init__(self, arch: Arch = "st_gcn", *, num_classes: int | None = None,
                 graph: str | SkeletonGraph = "ntu", in_channels: int = 3, num_persons: int = 2,
                 clip_length: int = 300, head_pool: int | None = None, star: bool = False,
                 adjacency_scope: AdjacencyScope = "frame", width: int = 64, heads: int = 8,
                 head_activation: str | None = None) -> None:
        if arch not in _ARCHS:
            raise ValueError(f"STGCN arch must be one of {_ARCHS}, got {arch!r}")
        g = skeleton_graph(graph)
        in_channels = check_positive("in_channels", in_channels)
        num_persons = check_positive("num_persons", num_persons)
        clip_length = check_positive("clip_length", clip_length)
        width = check_positive("width", width)
        if num_classes is None:
            num_classes = _DEFAULT_CLASSES.get(g.name, 60)
        num_classes = check_positive("num_classes", num_classes)
        adjacency = g.partitions()
        blocks: list[tuple[str, nn.Module]] = []
        c_in = in_channels
        for i, (factor, stride) in enumerate(_BLOCKS):
            c_out = factor * width
            if arch == "agcn":
                gcn: nn.Module = AdaptiveGraphConv(c_in, c_out, adjacency, adjacency_scope)
            elif arch == "s_tr" and i >= _ATTENTION_FROM:
                gcn = SpatialAttention(c_in, c_out, adjacency, heads=heads)
            else:
                gcn = GraphConv(c_in, c_out, adjacency)
            blocks.append((f"layer{i + 1}", _block(gcn, c_in, c_out, 1 if star else stride,
                                                   residual=i > 0, star=star)))
            c_in = c_out
        layers = cs.Sequential(OrderedDict(blocks))
        frames_left = layers.temporal.out_length(clip_length)
        if frames_left < 1:
            raise ValueError(f"clip_length {clip_length} is shorter than the receptive field of "
                             f"the temporal convolutions ({layers.receptive_field} frames)")
        head_pool = check_positive("head_pool", head_pool or frames_left)
        head: list[tuple[str, nn.Module]] = [
            ("pool", cs.AdaptiveAvgPool2d((1, 1), window=head_pool)),
            ("fc", cs.Linear(c_in, num_classes)),
        ]
        if head_activation == "softmax":
            head.append(("activation", nn.Softmax(dim=1)))
        elif head_activation == "sigmoid":
            head.append(("activation", nn.Sigmoid()))
        elif head_activation is not None:
            raise ValueError(f"head_activation must be 'softmax', 'sigmoid' or None, "
                             f"got {head_activation!r}")
        super().__init__(OrderedDict([
            ("data_bn", SkeletonInputNorm(in_channels, g.num_joints, num_persons)),
            ("layers", layers),
            *head,
            ("flatten", cs.Reshape(-1)),
        ]))
        self.arch = arch
        self.graph = g
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.num_persons = num_persons
        self.clip_length = clip_length
        self.head_pool = head_pool
        self.star = star
        self.adjacency_scope = adjacency_scope if arch == "agcn" else "frame"
        self.width = width

    @property
    def streamable(self) -> bool:
        """Whether ``forward_step`` can run (all but the clip-scope AGCN)."""
        return self.adjacency_scope == "frame"

    @property
    def input_shape(self) -> tuple[int, int, int, int]:
        """``(C, T, V, M)`` of the clip this configuration is for."""
        return (self.in_channels, self.clip_length, self.graph.num_joints, self.num_persons)

    def extra_repr(self) -> str:
        scope = f", adjacency_scope={self.adjacency_scope!r}" if self.arch == "agcn" else ""
        return (f"arch={self.arch!r}, graph={self.graph.name!r}, star={self.star}, "
                f"clip_length={self.clip_length}, head_pool={self.head_pool}{scope}")


def _block(gcn: nn.Module, c_in: int, c_out: int, stride: int, *, residual: bool,
           star: bool) -> SpatioTemporalBlock:
    """Graph layer, temporal convolution (kernel 9) and residual (1x1 convolution when the
    width or rate changes); ``star`` drops the temporal padding."""
    pad = 0 if star else (_KERNEL - 1) // 2
    tcn = cs.Sequential(OrderedDict(
        t_conv=TemporalConv(c_out, c_out, (_KERNEL, 1), stride=(stride, 1), padding=(pad, 0)),
        bn=nn.BatchNorm2d(c_out),
    ))
    main = cs.Sequential(OrderedDict(gcn=gcn, tcn=tcn))
    if not residual:
        return SpatioTemporalBlock(main, None)
    if c_in == c_out and stride == 1:
        return SpatioTemporalBlock(main, nn.Identity())
    shortcut = cs.Sequential(OrderedDict(
        t_conv=TemporalConv(c_in, c_out, (1, 1), stride=(stride, 1)),
        bn=nn.BatchNorm2d(c_out),
    ))
    return SpatioTemporalBlock(main, shortcut)


def _model(arch: Arch, star: bool, **kwargs: Any) -> STGCN:
    return STGCN(arch, star=star, **kwargs)


@register_model(family="skeleton")
def st_gcn(**kwargs: Any) -> STGCN:
    """ST-GCN, offline: 300-frame clips, temporal strides and padding as published."""
    return _model("st_gcn", False, **kwargs)


@register_model(family="skeleton")
def cost_gcn(**kwargs: Any) -> STGCN:
    """CoST-GCN: continual ST-GCN (strides kept, one prediction per 4 frames)."""
    return _model("st_gcn", False, **kwargs)


@register_model(family="skeleton")
def cost_gcn_star(**kwargs: Any) -> STGCN:
    """CoST-GCN*: continual ST-GCN without strides or temporal padding (a prediction per
    frame, each over its own 300-frame window)."""
    return _model("st_gcn", True, **kwargs)


@register_model(family="skeleton")
def agcn(**kwargs: Any) -> STGCN:
    """AGCN, offline: adaptive adjacency from the whole clip (cannot be stepped)."""
    kwargs.setdefault("adjacency_scope", "clip")
    return _model("agcn", False, **kwargs)


@register_model(family="skeleton")
def coagcn(**kwargs: Any) -> STGCN:
    """CoAGCN: continual AGCN with a per-frame adaptive adjacency (strides kept)."""
    return _model("agcn", False, **kwargs)


@register_model(family="skeleton")
def coagcn_star(**kwargs: Any) -> STGCN:
    """CoAGCN*: CoAGCN without strides or temporal padding."""
    return _model("agcn", True, **kwargs)


@register_model(family="skeleton")
def s_tr(**kwargs: Any) -> STGCN:
    """S-TR, offline: spatial self-attention in blocks 4-10, strides and padding as published."""
    return _model("s_tr", False, **kwargs)


@register_model(family="skeleton")
def cos_tr(**kwargs: Any) -> STGCN:
    """CoS-TR: continual S-TR (strides kept, one prediction per 4 frames)."""
    return _model("s_tr", False, **kwargs)


@register_model(family="skeleton")
def cos_tr_star(**kwargs: Any) -> STGCN:
    """CoS-TR*: CoS-TR without strides or temporal padding."""
    return _model("s_tr", True, **kwargs)
