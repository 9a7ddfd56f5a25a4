"""Per-frame layers of the ST-GCN family: input norm, graph convolutions, spatial attention.

Skeleton clips are ``(N, C, T, V, M)`` (batch, coordinates, frames, joints, persons). After the
input normalisation the persons move next to the joints: features are ``(N, C, T, M * V)``
(person-major), so each person's joints form one block of the last axis, persons stay apart
(no layer mixes them) and the batch dimension stays the stream dimension. Every layer here acts
on each frame independently (a :class:`costream` frame map, no state, no delay); the temporal
convolutions between them are :class:`costream.Conv2d` layers with ``(9, 1)`` kernels
(:class:`~costream.models.skeleton._stgcn_linear.TemporalConv`).

Parameter names follow the published checkpoints of the ST-GCN family (``A``, ``graph_attn``,
``g_conv``, ``a_conv``, ``b_conv``, ``gcn_residual``, ``bn``, ``data_bn``, ``attention_conv``).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import costream as cs

from ...modules._cache import DerivedCache
from ...modules._frame import _FrameMap
from ._stgcn_linear import linear_channels

AdjacencyScope = Literal["clip", "frame"]

def _conv_weight(conv: nn.Conv2d) -> Tensor:
    return conv.weight.view(conv.weight.shape[0], -1)


def _shortcut(x: Tensor, residual: nn.Sequential | None) -> Tensor:
    """The graph layer's residual: ``x``, or its 1x1 convolution (as a GEMM) and batch norm."""
    if residual is None:
        return x
    conv, bn = residual[0], residual[1]
    return bn(linear_channels(x, _conv_weight(conv), conv.bias))


class _SkeletonFrameMap(_FrameMap):
    """A per-frame map over features ``(N, C, T, M * V)``; frames ``(N, C, M * V)``."""

    in_channels: int

    def _forward(self, x: Tensor) -> Tensor:
        """The map on a clip ``(N, C, T, S)``."""
        raise NotImplementedError

    def _input_spec(self) -> tuple[int | None, int | None]:
        return 3, self.in_channels

    def _map(self, x: Tensor) -> Tensor:
        if self.training:
            raise RuntimeError(f"{type(self).__name__} in training mode normalises over the "
                               f"frames of a clip; call .eval() before stepping")
        return self._forward(x.unsqueeze(2)).squeeze(2)

    def _map_clip(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"{type(self).__name__} expects features (N, {self.in_channels}, "
                             f"T, M * V), got {getattr(x, 'shape', type(x))}")
        return self._forward(x)


class SkeletonInputNorm(_FrameMap, nn.BatchNorm1d):
    """The input batch norm (``data_bn``) over every frame's ``M * V * C`` coordinates.

    Normalises each (person, joint, coordinate) feature and moves persons next to the joints:
    clips ``(N, C, T, V, M)`` become features ``(N, C, T, M * V)``, frames ``(N, C, V, M)``
    become ``(N, C, M * V)``. The parameters are those of ``BatchNorm1d(M * V * C)`` with
    features ordered person, joint, coordinate (the published layout).

    Example:
        >>> import torch
        >>> from costream.models.skeleton._stgcn_layers import SkeletonInputNorm
        >>> norm = SkeletonInputNorm(3, 25, 2).eval()
        >>> norm(torch.randn(1, 3, 6, 25, 2)).shape
        torch.Size([1, 3, 6, 50])
        >>> norm.forward_step(torch.randn(1, 3, 25, 2)).shape
        torch.Size([1, 3, 50])
    """

    def __init__(self, in_channels: int, num_joints: int, num_persons: int) -> None:
        nn.BatchNorm1d.__init__(self, num_persons * num_joints * in_channels)
        self.in_channels, self.num_joints, self.num_persons = in_channels, num_joints, num_persons

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, in_channels={self.in_channels}, "
                f"joints={self.num_joints}, persons={self.num_persons}")

    def _input_spec(self) -> tuple[int | None, int | None]:
        return 4, self.in_channels

    def _check(self, shape: tuple[int, ...], clip: bool) -> None:
        c, v, m = self.in_channels, self.num_joints, self.num_persons
        want = (c, v, m)
        got = (shape[1], *shape[-2:]) if len(shape) == (5 if clip else 4) else None
        if got != want:
            kind = f"clips (N, {c}, T, {v}, {m})" if clip else f"frames (N, {c}, {v}, {m})"
            raise ValueError(f"expected skeleton {kind} (coordinates, [frames,] joints, persons), "
                             f"got shape {tuple(shape)}")

    def _map(self, x: Tensor) -> Tensor:
        self._check(tuple(x.shape), clip=False)
        if self.training:
            raise RuntimeError("data_bn in training mode normalises over the frames of a clip; "
                               "call .eval() before stepping")
        n, c, v, m = x.shape
        flat = F.batch_norm(x.permute(0, 3, 2, 1).reshape(n, m * v * c), self.running_mean,
                            self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        return flat.view(n, m, v, c).permute(0, 3, 1, 2).reshape(n, c, m * v)

    def _map_clip(self, x: Tensor) -> Tensor:
        self._check(tuple(x.shape), clip=True)
        n, c, t, v, m = x.shape
        flat = nn.BatchNorm1d.forward(self, x.permute(0, 4, 3, 1, 2).reshape(n, m * v * c, t))
        return flat.view(n, m, v, c, t).permute(0, 3, 4, 1, 2).reshape(n, c, t, m * v)


def _residual(in_channels: int, out_channels: int) -> nn.Sequential | None:
    if in_channels == out_channels:
        return None
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 1), nn.BatchNorm2d(out_channels))


class GraphConv(_SkeletonFrameMap):
    """ST-GCN's spatial graph convolution of every frame (Yan et al., arXiv 1801.07455).

    ``relu(bn(sum_k g_conv[k](x @ (A[k] * graph_attn[k]))) + gcn_residual(x))`` where ``A`` holds
    the graph's partitions (a buffer), ``graph_attn`` the learnable edge importance
    (initialised to 1) and ``gcn_residual`` is a 1x1 convolution with batch norm when the
    width changes (else the identity). The three partitions run as one matrix product with the
    concatenated adjacency and one with the concatenated ``g_conv`` weights.

    Shape:
        ``(N, C_in, T, M * V)`` -> ``(N, C_out, T, M * V)``; frames ``(N, C_in, M * V)``.

    Example:
        >>> import torch
        >>> from costream.models import skeleton_graph
        >>> from costream.models.skeleton._stgcn_layers import GraphConv
        >>> gcn = GraphConv(3, 8, skeleton_graph("ntu").partitions()).eval()
        >>> x = torch.randn(1, 3, 4, 50)
        >>> torch.allclose(gcn.forward_steps(x), gcn(x), atol=1e-6)
        True
    """

    def __init__(self, in_channels: int, out_channels: int, adjacency: Tensor) -> None:
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        k = adjacency.shape[0]
        self.register_buffer("A", adjacency.detach().clone().float())
        self.graph_attn = nn.Parameter(torch.ones_like(self.A))
        self.g_conv = nn.ModuleList(nn.Conv2d(in_channels, out_channels, 1) for _ in range(k))
        self.gcn_residual = _residual(in_channels, out_channels)
        self.bn = nn.BatchNorm2d(out_channels)
        self._fused_cache = DerivedCache(self._fused)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, partitions={self.A.shape[0]}"

    def _sources(self) -> tuple[Tensor, ...]:
        convs = tuple(self.g_conv)
        return (self.A, self.graph_attn, *(c.weight for c in convs), *(c.bias for c in convs))

    def _fused(self) -> tuple[Tensor, Tensor, Tensor]:
        """Adjacency ``(V, K * V)``, weights ``(C_out, K * C_in)`` and the summed bias."""
        a = self.A * self.graph_attn
        k, v = a.shape[:2]
        a_cat = a.permute(1, 0, 2).reshape(v, k * v)
        w_cat = torch.cat([_conv_weight(c) for c in self.g_conv], dim=1)
        b_sum = sum(c.bias for c in self.g_conv)
        return a_cat, w_cat, b_sum

    def _forward(self, x: Tensor) -> Tensor:
        a_cat, w_cat, b_sum = self._fused_cache.get(*self._sources())
        n, c, t, s = x.shape
        v = a_cat.shape[0]
        k = a_cat.shape[1] // v
        xa = torch.matmul(x.reshape(n, c, t, s // v, v), a_cat)  # (N, C, T, M, K * V)
        xa = xa.view(n, c, t, s // v, k, v).permute(0, 4, 1, 2, 3, 5).reshape(n, k * c, t, s)
        y = self.bn(linear_channels(xa, w_cat, b_sum))
        y += _shortcut(x, self.gcn_residual)
        return y.relu_()


class AdaptiveGraphConv(_SkeletonFrameMap):
    """2s-AGCN's adaptive graph convolution (Shi et al., CVPR 2019, arXiv 1805.07694).

    For each partition ``k`` the adjacency is ``A[k] + graph_attn[k] + C_k(x)``, where ``A`` is
    the graph (a buffer), ``graph_attn`` a learnable matrix (the paper's ``B_k``) and
    ``C_k = softmax(theta_k(x)^T phi_k(x) / d)`` a data-dependent one, with ``theta_k = a_conv[k]``
    and ``phi_k = b_conv[k]`` 1x1 convolutions to ``C_out / 4`` channels and the softmax over the
    first joint index. Then ``relu(bn(sum_k g_conv[k](x @ adjacency_k)) + gcn_residual(x))``.

    ``scope`` decides what ``C_k`` is computed from:

    * ``"clip"`` (the published AGCN): the embeddings of all ``T`` frames of the clip
      (``theta_k(x)^T`` is ``(V, C_out / 4 * T)``, ``d = C_out / 4 * T``): one adjacency per clip,
      which depends on every frame, so it cannot be computed frame by frame;
    * ``"frame"`` (CoAGCN, arXiv 2203.11009): each frame's own embeddings (``d = C_out / 4``),
      one adjacency per frame. This streams exactly, and approximates the clip-scope
      adjacency: a network trained with one scope gives different outputs with the other.

    Shape:
        ``(N, C_in, T, M * V)`` -> ``(N, C_out, T, M * V)``; frames ``(N, C_in, M * V)``
        (``"frame"`` scope only).

    Example:
        >>> import torch
        >>> from costream.models import skeleton_graph
        >>> from costream.models.skeleton._stgcn_layers import AdaptiveGraphConv
        >>> a = skeleton_graph("ntu").partitions()
        >>> gcn = AdaptiveGraphConv(3, 8, a, scope="frame").eval()
        >>> x = torch.randn(1, 3, 4, 50)
        >>> torch.allclose(gcn.forward_steps(x), gcn(x), atol=1e-6)
        True
        >>> AdaptiveGraphConv(3, 8, a, scope="clip").eval()(x).shape
        torch.Size([1, 8, 4, 50])
    """

    def __init__(self, in_channels: int, out_channels: int, adjacency: Tensor,
                 scope: AdjacencyScope = "frame", embedding_factor: int = 4) -> None:
        super().__init__()
        if scope not in ("clip", "frame"):
            raise ValueError(f"adjacency_scope must be 'clip' or 'frame', got {scope!r}")
        self.in_channels, self.out_channels, self.scope = in_channels, out_channels, scope
        k = adjacency.shape[0]
        inter = max(1, out_channels // embedding_factor)
        self.inter_channels = inter
        self.register_buffer("A", adjacency.detach().clone().float())
        self.graph_attn = nn.Parameter(torch.full_like(self.A, 1e-6))
        self.a_conv = nn.ModuleList(nn.Conv2d(in_channels, inter, 1) for _ in range(k))
        self.b_conv = nn.ModuleList(nn.Conv2d(in_channels, inter, 1) for _ in range(k))
        self.g_conv = nn.ModuleList(nn.Conv2d(in_channels, out_channels, 1) for _ in range(k))
        self.gcn_residual = _residual(in_channels, out_channels)
        self.bn = nn.BatchNorm2d(out_channels)
        self._fused_cache = DerivedCache(self._fused)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, partitions={self.A.shape[0]}, "
                f"scope={self.scope!r}")

    def _fused(self) -> tuple[Tensor, ...]:
        """Embedding weights ``(2 * K * C_e, C_in)`` and bias, graph convolution weights
        ``(C_out, K * C_in)`` and summed bias, and the static adjacency ``(K, V, V)``."""
        convs = [*self.a_conv, *self.b_conv]
        w_ab = torch.cat([_conv_weight(c) for c in convs], dim=0)
        b_ab = torch.cat([c.bias for c in convs], dim=0)
        w_g = torch.cat([_conv_weight(c) for c in self.g_conv], dim=1)
        b_g = sum(c.bias for c in self.g_conv)
        return w_ab, b_ab, w_g, b_g, self.A + self.graph_attn

    def _sources(self) -> tuple[Tensor, ...]:
        convs = (*self.a_conv, *self.b_conv, *self.g_conv)
        return (self.A, self.graph_attn, *(c.weight for c in convs), *(c.bias for c in convs))

    def _map(self, x: Tensor) -> Tensor:
        if self.scope == "clip":
            raise RuntimeError(
                "AdaptiveGraphConv(scope='clip') computes its adjacency from all frames of a "
                "clip, so it cannot run frame by frame; build the model with "
                "adjacency_scope='frame' to stream it (e.g. costream.models.create_model("
                "'coagcn'))")
        return super()._map(x)

    def _steps(self, x: Tensor, state, age, phase):
        if self.scope == "clip":
            self._map(x)  # raises
        return super()._steps(x, state, age, phase)

    def _forward(self, x: Tensor) -> Tensor:
        w_ab, b_ab, w_g, b_g, static = self._fused_cache.get(*self._sources())
        n, c, t, s = x.shape
        k, v = static.shape[:2]
        m, e = s // v, self.inter_channels
        ab = linear_channels(x, w_ab, b_ab).view(n, 2, k, e, t, m, v)
        if self.scope == "clip":  # one (V, V) attention per clip, partition and person
            theta = ab[:, 0].permute(0, 1, 4, 5, 2, 3).reshape(n, k, m, v, e * t)
            phi = ab[:, 1].permute(0, 1, 4, 2, 3, 5).reshape(n, k, m, e * t, v)
            att = torch.softmax(torch.matmul(theta, phi) / (e * t), dim=-2)  # (N, K, M, V, V)
            adj = att + static.view(1, k, 1, v, v)
            xs = x.view(n, c, t, m, v).permute(0, 3, 1, 2, 4).reshape(n, 1, m, c * t, v)
            xa = torch.matmul(xs, adj).view(n, k, m, c, t, v).permute(0, 1, 3, 4, 2, 5)
        else:  # one (V, V) attention per frame, partition and person
            theta = ab[:, 0].permute(0, 1, 3, 4, 5, 2)  # (N, K, T, M, V, C_e)
            phi = ab[:, 1].permute(0, 1, 3, 4, 2, 5)  # (N, K, T, M, C_e, V)
            att = torch.softmax(torch.matmul(theta, phi) / e, dim=-2)  # (N, K, T, M, V, V)
            adj = att + static.view(1, k, 1, 1, v, v)
            xs = x.view(n, c, t, m, v).permute(0, 2, 3, 1, 4).unsqueeze(1)  # (N, 1, T, M, C, V)
            xa = torch.matmul(xs, adj).permute(0, 1, 4, 2, 3, 5)  # (N, K, C, T, M, V)
        y = self.bn(linear_channels(xa.reshape(n, k * c, t, s), w_g, b_g))
        y += _shortcut(x, self.gcn_residual)
        return y.relu_()


class SpatialAttention(_SkeletonFrameMap):
    """S-TR's spatial self-attention over the joints of every frame (Plizzari et al., arXiv
    2008.07404), in the configuration of the continual S-TR (arXiv 2203.11009).

    Per frame and person: ``data_bn`` (batch norm over the ``C_in * V`` features), a 1x1
    convolution to queries and keys (``C_out / 4`` channels each) and values (``C_out``
    channels), ``heads`` heads of scaled dot-product attention among the ``V`` joints, a 1x1
    output convolution (``attn_out``); the input is added when the width is unchanged; then
    ``bn`` and ReLU. There is no relative positional encoding, no adjacency term and (at
    inference) no drop-connect.

    ``A`` holds the graph's partitions as a trainable ``(K, V, V)`` parameter that the attention
    does not read: the published S-TR keeps it, so its checkpoints load unchanged and its
    parameter count (3.09 M) includes it.

    Shape:
        ``(N, C_in, T, M * V)`` -> ``(N, C_out, T, M * V)``; frames ``(N, C_in, M * V)``.

    Example:
        >>> import torch
        >>> from costream.models import skeleton_graph
        >>> from costream.models.skeleton._stgcn_layers import SpatialAttention
        >>> att = SpatialAttention(8, 8, skeleton_graph("ntu").partitions(), heads=2).eval()
        >>> x = torch.randn(1, 8, 4, 50)
        >>> torch.allclose(att.forward_steps(x), att(x), atol=1e-6)
        True
    """

    def __init__(self, in_channels: int, out_channels: int, adjacency: Tensor,
                 heads: int = 8, key_factor: float = 0.25) -> None:
        super().__init__()
        dk, dv = int(out_channels * key_factor), out_channels
        if heads < 1 or dk % heads or dv % heads:
            raise ValueError(f"attention heads ({heads}) must divide the key width ({dk}) and "
                             f"the value width ({dv})")
        self.in_channels, self.out_channels, self.heads = in_channels, out_channels, heads
        self.key_channels = dk
        v = adjacency.shape[-1]
        self.num_joints = v
        self.data_bn = nn.BatchNorm1d(in_channels * v)
        self.A = nn.Parameter(adjacency.detach().clone().float())
        self.attention_conv = nn.Module()
        self.attention_conv.qkv_conv = nn.Conv2d(in_channels, 2 * dk + dv, 1)
        self.attention_conv.attn_out = nn.Conv2d(dv, dv, 1)
        self.bn = nn.BatchNorm2d(out_channels)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, heads={self.heads}"

    def _forward(self, x: Tensor) -> Tensor:
        n, c, t, s = x.shape
        v = self.num_joints
        m, h, dk, dv = s // v, self.heads, self.key_channels, self.out_channels
        xb = x.view(n, c, t, m, v).permute(0, 3, 1, 4, 2).reshape(n * m, c * v, t)
        xb = self.data_bn(xb).view(n, m, c, v, t).permute(0, 2, 4, 1, 3).reshape(n, c, t, s)
        convs = self.attention_conv
        qkv = linear_channels(xb, _conv_weight(convs.qkv_conv), convs.qkv_conv.bias)
        q, k, val = qkv.split((dk, dk, dv), dim=1)
        q = q * (dk // h) ** -0.5
        q = q.reshape(n, h, dk // h, t, m, v).permute(0, 3, 4, 1, 5, 2)  # (N, T, M, H, V, dk/H)
        k = k.reshape(n, h, dk // h, t, m, v).permute(0, 3, 4, 1, 2, 5)  # (N, T, M, H, dk/H, V)
        val = val.reshape(n, h, dv // h, t, m, v).permute(0, 3, 4, 1, 5, 2)
        weights = torch.softmax(torch.matmul(q, k), dim=-1)
        out = torch.matmul(weights, val).permute(0, 3, 5, 1, 2, 4).reshape(n, dv, t, s)
        y = linear_channels(out, _conv_weight(convs.attn_out), convs.attn_out.bias)
        if self.in_channels == self.out_channels:
            y = y + x
        return self.bn(y).relu_()


class SpatioTemporalBlock(cs.BroadcastReduce):
    """``relu(main(x) + residual(x))`` with the residual aligned in time (no residual: ``None``).

    ``main`` is the graph layer and the temporal convolution; the residual branch is cropped
    (centred) offline and delayed online by the container.

    Example:
        >>> import torch, costream as cs
        >>> from collections import OrderedDict
        >>> from costream.models.skeleton._stgcn_layers import SpatioTemporalBlock
        >>> main = cs.Sequential(OrderedDict(tcn=cs.Conv2d(4, 4, (9, 1))))
        >>> block = SpatioTemporalBlock(main, torch.nn.Identity())
        >>> block(torch.randn(1, 4, 12, 5)).shape, block.delay  # residual cropped by 4 + 4
        (torch.Size([1, 4, 4, 5]), 8)
    """

    def __init__(self, main: nn.Module, residual: nn.Module | None) -> None:
        branches = OrderedDict(main=main)
        if residual is not None:
            branches["residual"] = residual
        super().__init__(branches, reduce="sum")

    def _combine(self, outs) -> Tensor:
        if len(outs) == 1:
            return torch.relu(outs[0])
        return (outs[0] + outs[1]).relu_()
