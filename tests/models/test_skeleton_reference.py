"""An independent reference of the published ST-GCN family, for the skeleton tests.

``published_state`` writes a state dict in the published key layout (from its description:
``data_bn``, ``layers.layerK.{gcn,tcn,residual}``, ``fc``) with random values, and
``reference_forward`` runs the published computation on it with plain torch functions, in the
published tensor layout (persons folded into the batch, ``(N * M, C, T, V)``), one partition
and one frame at a time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

WIDTHS = (1, 1, 1, 1, 2, 2, 2, 4, 4, 4)
STRIDES = (1, 1, 1, 1, 2, 1, 1, 2, 1, 1)
K = 3  # partitions


def _f64(t: Tensor) -> Tensor:
    """Random values drawn in float32: a float32 model loads them without rounding."""
    return t.double()


def _bn(state: dict, prefix: str, n: int, gen: torch.Generator) -> None:
    state[prefix + "weight"] = _f64(torch.rand(n, generator=gen) + 0.5)
    state[prefix + "bias"] = _f64(torch.randn(n, generator=gen) * 0.1)
    state[prefix + "running_mean"] = _f64(torch.randn(n, generator=gen) * 0.1)
    state[prefix + "running_var"] = _f64(torch.rand(n, generator=gen) + 0.5)
    state[prefix + "num_batches_tracked"] = torch.tensor(7)


def _conv(state: dict, prefix: str, c_out: int, c_in: int, kt: int, gen: torch.Generator) -> None:
    scale = (c_in * kt) ** -0.5
    state[prefix + "weight"] = _f64(torch.randn(c_out, c_in, kt, 1, generator=gen) * scale)
    state[prefix + "bias"] = _f64(torch.randn(c_out, generator=gen) * 0.1)


def published_state(arch: str, *, width: int, num_classes: int, joints: int, persons: int,
                    channels: int = 3, adjacency: Tensor | None = None, seed: int = 0) -> dict:
    """A random state dict in the published layout of ``arch`` (``st_gcn``, ``agcn``, ``s_tr``)."""
    gen = torch.Generator().manual_seed(seed)
    state: dict[str, Tensor] = {}
    _bn(state, "data_bn.", persons * joints * channels, gen)
    if adjacency is None:
        adjacency = _f64(torch.rand(K, joints, joints, generator=gen) * 0.3)
    c_in = channels
    for i, (f, s) in enumerate(zip(WIDTHS, STRIDES)):
        c_out = f * width
        p = f"layers.layer{i + 1}."
        if arch == "s_tr" and i >= 3:
            dk = c_out // 4
            state[p + "gcn.A"] = adjacency.clone()
            _bn(state, p + "gcn.data_bn.", c_in * joints, gen)
            _conv(state, p + "gcn.attention_conv.qkv_conv.", 2 * dk + c_out, c_in, 1, gen)
            _conv(state, p + "gcn.attention_conv.attn_out.", c_out, c_out, 1, gen)
        else:
            state[p + "gcn.A"] = adjacency.clone()
            state[p + "gcn.graph_attn"] = _f64(torch.rand(K, joints, joints, generator=gen) + 0.5)
            for k in range(K):
                _conv(state, f"{p}gcn.g_conv.{k}.", c_out, c_in, 1, gen)
                if arch == "agcn":
                    _conv(state, f"{p}gcn.a_conv.{k}.", c_out // 4, c_in, 1, gen)
                    _conv(state, f"{p}gcn.b_conv.{k}.", c_out // 4, c_in, 1, gen)
            if c_in != c_out:
                _conv(state, p + "gcn.gcn_residual.0.", c_out, c_in, 1, gen)
                _bn(state, p + "gcn.gcn_residual.1.", c_out, gen)
        _bn(state, p + "gcn.bn.", c_out, gen)
        _conv(state, p + "tcn.t_conv.", c_out, c_out, 9, gen)
        _bn(state, p + "tcn.bn.", c_out, gen)
        if i > 0 and (c_in != c_out or s != 1):
            _conv(state, p + "residual.t_conv.", c_out, c_in, 1, gen)
            _bn(state, p + "residual.bn.", c_out, gen)
        c_in = c_out
    state["fc.weight"] = _f64(torch.randn(num_classes, c_in, generator=gen) * 0.1)
    state["fc.bias"] = _f64(torch.randn(num_classes, generator=gen) * 0.1)
    return state


def _batch_norm(x: Tensor, sd: dict, prefix: str) -> Tensor:
    return F.batch_norm(x, sd[prefix + "running_mean"], sd[prefix + "running_var"],
                        sd[prefix + "weight"], sd[prefix + "bias"], False, 0.0, 1e-5)


def _conv2d(x: Tensor, sd: dict, prefix: str, **kwargs) -> Tensor:
    return F.conv2d(x, sd[prefix + "weight"], sd[prefix + "bias"], **kwargs)


def _graph_conv(x: Tensor, sd: dict, p: str) -> Tensor:
    n, c, t, v = x.shape
    a = sd[p + "A"] * sd[p + "graph_attn"]
    total = 0
    for k in range(K):
        xa = torch.matmul(x.reshape(n, c * t, v), a[k]).view(n, c, t, v)
        total = total + _conv2d(xa, sd, f"{p}g_conv.{k}.")
    return _gcn_out(total, x, sd, p)


def _gcn_out(total: Tensor, x: Tensor, sd: dict, p: str) -> Tensor:
    y = _batch_norm(total, sd, p + "bn.")
    if p + "gcn_residual.0.weight" in sd:
        y = y + _batch_norm(_conv2d(x, sd, p + "gcn_residual.0."), sd, p + "gcn_residual.1.")
    else:
        y = y + x
    return torch.relu(y)


def _adaptive_graph_conv(x: Tensor, sd: dict, p: str) -> Tensor:
    """The published AGCN layer: one attention over all frames of ``x``."""
    n, c, t, v = x.shape
    a = sd[p + "A"] + sd[p + "graph_attn"]
    total = 0
    for k in range(K):
        theta = _conv2d(x, sd, f"{p}a_conv.{k}.")
        e = theta.shape[1]
        theta = theta.permute(0, 3, 1, 2).reshape(n, v, e * t)
        phi = _conv2d(x, sd, f"{p}b_conv.{k}.").reshape(n, e * t, v)
        adj = torch.softmax(torch.matmul(theta, phi) / (e * t), dim=-2) + a[k]
        xa = torch.matmul(x.reshape(n, c * t, v), adj).view(n, c, t, v)
        total = total + _conv2d(xa, sd, f"{p}g_conv.{k}.")
    return _gcn_out(total, x, sd, p)


def _attention(x: Tensor, sd: dict, p: str, heads: int) -> Tensor:
    """The published S-TR spatial attention unit, frame by frame."""
    n, c, t, v = x.shape
    xn = _batch_norm(x.permute(0, 1, 3, 2).reshape(n, c * v, t), sd, p + "data_bn.")
    xn = xn.view(n, c, v, t).permute(0, 1, 3, 2)
    w_qkv = sd[p + "attention_conv.qkv_conv.weight"]
    dv = sd[p + "attention_conv.attn_out.weight"].shape[0]
    dk = (w_qkv.shape[0] - dv) // 2
    frames = []
    for f in range(t):
        xf = xn[:, :, f:f + 1]  # (N, C, 1, V)
        q, key, val = _conv2d(xf, sd, p + "attention_conv.qkv_conv.").split((dk, dk, dv), 1)
        q = q.reshape(n, heads, dk // heads, v) * (dk // heads) ** -0.5
        key = key.reshape(n, heads, dk // heads, v)
        val = val.reshape(n, heads, dv // heads, v)
        weights = torch.softmax(torch.matmul(q.transpose(2, 3), key), dim=-1)
        out = torch.matmul(weights, val.transpose(2, 3))  # (N, heads, V, dv / heads)
        out = out.permute(0, 1, 3, 2).reshape(n, dv, 1, v)
        frames.append(_conv2d(out, sd, p + "attention_conv.attn_out."))
    y = torch.cat(frames, dim=2)
    if c == dv:
        y = y + x
    return torch.relu(_batch_norm(y, sd, p + "bn."))


def reference_forward(sd: dict, x: Tensor, arch: str, *, star: bool = False,
                      scope: str = "clip", heads: int = 8) -> Tensor:
    """Logits ``(N, classes)`` of the published network on clip ``x`` ``(N, C, T, V, M)``."""
    n, c, t, v, m = x.shape
    h = x.permute(0, 4, 3, 1, 2).reshape(n, m * v * c, t)
    h = _batch_norm(h, sd, "data_bn.").view(n, m, v, c, t).permute(0, 1, 3, 4, 2)
    h = h.reshape(n * m, c, t, v)
    for i in range(10):
        p = f"layers.layer{i + 1}."
        stride, pad = (1, 0) if star else (STRIDES[i], 4)
        if arch == "s_tr" and i >= 3:
            g = _attention(h, sd, p + "gcn.", heads)
        elif arch == "agcn" and scope == "frame":
            g = torch.cat([_adaptive_graph_conv(h[:, :, f:f + 1], sd, p + "gcn.")
                           for f in range(h.shape[2])], dim=2)
        elif arch == "agcn":
            g = _adaptive_graph_conv(h, sd, p + "gcn.")
        else:
            g = _graph_conv(h, sd, p + "gcn.")
        z = _batch_norm(_conv2d(g, sd, p + "tcn.t_conv.", stride=(stride, 1),
                                padding=(pad, 0)), sd, p + "tcn.bn.")
        if i == 0:
            r = 0
        else:
            r = h
            if p + "residual.t_conv.weight" in sd:
                r = _batch_norm(_conv2d(h, sd, p + "residual.t_conv.", stride=(stride, 1)),
                                sd, p + "residual.bn.")
            if star:
                r = r[:, :, 4:-4]
        h = torch.relu(z + r)
    pooled = h.view(n, m, h.shape[1], -1).mean(3).mean(1)
    return F.linear(pooled, sd["fc.weight"], sd["fc.bias"])


# ------------------------------------------------------------------ the reference's own checks
def test_reference_graph_conv_with_self_loops_only_is_a_pointwise_map() -> None:
    """With ``A = [I, 0, 0]`` and unit edge importance the layer reduces to conv, BN, ReLU."""
    sd = published_state("st_gcn", width=8, num_classes=3, joints=5, persons=1)
    p = "layers.layer2.gcn."
    a = torch.zeros(K, 5, 5, dtype=torch.float64)
    a[0] = torch.eye(5, dtype=torch.float64)
    sd[p + "A"], sd[p + "graph_attn"] = a, torch.ones_like(a)
    x = torch.randn(2, 8, 3, 5, dtype=torch.float64)
    w, b = sd[p + "g_conv.0.weight"][:, :, 0, 0], sd[p + "g_conv.0.bias"]
    total = torch.einsum("oc,nctv->notv", w, x) + b.view(1, -1, 1, 1)
    for k in (1, 2):  # empty partitions still add their bias
        total = total + sd[f"{p}g_conv.{k}.bias"].view(1, -1, 1, 1)
    expected = torch.relu(_batch_norm(total, sd, p + "bn.") + x)
    torch.testing.assert_close(_graph_conv(x, sd, p), expected)


def test_reference_attention_with_one_joint_passes_the_values_through() -> None:
    """Attention over a single joint has weight 1: the unit is data_bn, v-projection, output."""
    sd = published_state("s_tr", width=8, num_classes=3, joints=1, persons=1)
    p = "layers.layer4.gcn."
    x = torch.randn(2, 8, 3, 1, dtype=torch.float64)
    xn = _batch_norm(x.reshape(2, 8, 3), sd, p + "data_bn.").view(2, 8, 3, 1)
    qkv = _conv2d(xn, sd, p + "attention_conv.qkv_conv.")
    out = _conv2d(qkv[:, 4:], sd, p + "attention_conv.attn_out.")  # dk = 2: values from 4
    expected = torch.relu(_batch_norm(out + x, sd, p + "bn."))
    torch.testing.assert_close(_attention(x, sd, p, heads=2), expected)
