"""Property-based sweeps: convolutions and pools of any small geometry meet the streaming contract.

Each example builds a ``torch.nn`` layer, converts it with :func:`costream.continual`, checks the
parameters are shared, and runs :func:`costream.testing.assert_streaming_equivalent` in float64
against the torch layer (``forward``, ``forward_steps(pad_end=True)``, the ``forward_step`` loop,
chunking, reset, the pure step, independent streams and save/resume).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import costream as cs
from costream.testing import assert_streaming_equivalent

SWEEP = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DTYPE = torch.float64


@st.composite
def conv_configs(draw: st.DrawFn) -> dict:
    ndim = draw(st.sampled_from([1, 2, 3]))
    k = draw(st.integers(1, 5))
    d = draw(st.integers(1, 3))
    cfg = {
        "ndim": ndim,
        "k": [k],
        "s": [draw(st.integers(1, 3))],
        "d": [d],
        "p": [draw(st.integers(0, (k - 1) * d))],
        "groups": draw(st.sampled_from([1, 2])),
        "mode": draw(st.sampled_from(["zeros", "replicate"])),
        "bias": draw(st.booleans()),
        "spatial": [],
    }
    for _ in range(ndim - 1):  # small spatial geometry; torch constrains it, not costream
        ks = draw(st.integers(1, 3))
        ds = draw(st.integers(1, 2))
        cfg["k"].append(ks)
        cfg["d"].append(ds)
        cfg["s"].append(draw(st.integers(1, 2)))
        cfg["p"].append(draw(st.integers(0, (ks - 1) * ds)))
        cfg["spatial"].append(draw(st.integers((ks - 1) * ds + 1, (ks - 1) * ds + 3)))
    # long enough for several outputs of the offline conv
    span = (k - 1) * d
    t_min = max(1, span + 1 - 2 * cfg["p"][0])
    cfg["t"] = t_min + draw(st.integers(2 * cfg["s"][0], 4 * cfg["s"][0] + 4))
    return cfg


@given(cfg=conv_configs())
@SWEEP
def test_conv_sweep(cfg: dict) -> None:
    ndim, g = cfg["ndim"], cfg["groups"]
    cls = getattr(nn, f"Conv{ndim}d")
    src = cls(2 * g, 3 * g, tuple(cfg["k"]), stride=tuple(cfg["s"]), padding=tuple(cfg["p"]),
              dilation=tuple(cfg["d"]), groups=g, bias=cfg["bias"],
              padding_mode=cfg["mode"]).to(DTYPE)
    co = cs.continual(src)
    assert type(co) is getattr(cs, f"Conv{ndim}d")
    assert co.weight is src.weight
    assert co.bias is src.bias
    # layers that subclass torch's keep torch's stride/padding tuples; time is in .temporal
    geom = co.temporal
    assert co.receptive_field == geom.receptive_field == (cfg["k"][0] - 1) * cfg["d"][0] + 1
    assert (geom.stride, geom.padding) == (cfg["s"][0], cfg["p"][0])
    assert co.delay == geom.receptive_field - 1 - cfg["p"][0]
    x = torch.randn(2, 2 * g, cfg["t"], *cfg["spatial"], dtype=DTYPE)
    assert_streaming_equivalent(co, x, src)


@st.composite
def pool_configs(draw: st.DrawFn) -> dict:
    ndim = draw(st.sampled_from([1, 2, 3]))
    kind = draw(st.sampled_from(["Avg", "Max"]))
    ks, ss, ds, ps, spatial = [], [], [], [], []
    for i in range(ndim):
        k = draw(st.integers(1, 5 if i == 0 else 3))
        d = draw(st.integers(1, 3 if i == 0 else 2)) if kind == "Max" else 1
        s = draw(st.integers(1, 3 if i == 0 else 2))
        p = draw(st.integers(0, k // 2))  # torch: padding at most half the kernel
        ks.append(k)
        ds.append(d)
        ss.append(s)
        ps.append(p)
        if i:
            # torch's avg_pool3d wants the unpadded input at least as large as the kernel
            spatial.append(draw(st.integers((k - 1) * d + 1, (k - 1) * d + 3)))
    default_stride = draw(st.booleans())
    span = (ks[0] - 1) * ds[0]
    stride_t = ks[0] if default_stride else ss[0]
    t = span + 1 + draw(st.integers(2 * stride_t, 4 * stride_t + 4))
    return {"ndim": ndim, "kind": kind, "k": ks, "s": None if default_stride else ss, "d": ds,
            "p": ps, "spatial": spatial, "t": t}


@given(cfg=pool_configs())
@SWEEP
def test_pool_sweep(cfg: dict) -> None:
    ndim, kind = cfg["ndim"], cfg["kind"]
    kwargs = {"kernel_size": tuple(cfg["k"]), "padding": tuple(cfg["p"])}
    if cfg["s"] is not None:
        kwargs["stride"] = tuple(cfg["s"])
    if kind == "Max":
        kwargs["dilation"] = tuple(cfg["d"])
    src = getattr(nn, f"{kind}Pool{ndim}d")(**kwargs)
    co = cs.continual(src)
    assert type(co) is getattr(cs, f"{kind}Pool{ndim}d")
    stride_t = cfg["k"][0] if cfg["s"] is None else cfg["s"][0]
    geom = co.temporal
    assert co.receptive_field == geom.receptive_field == (cfg["k"][0] - 1) * cfg["d"][0] + 1
    assert (geom.stride, geom.padding) == (stride_t, cfg["p"][0])
    x = torch.randn(2, 3, cfg["t"], *cfg["spatial"], dtype=DTYPE)
    assert_streaming_equivalent(co, x, src)


@given(k=st.integers(1, 5), s=st.integers(1, 3), d=st.integers(1, 3), data=st.data())
@SWEEP
def test_conv_chain_geometry_sweep(k: int, s: int, d: int, data: st.DataObject) -> None:
    """Two chained convs: geometry composes, and the chain meets the contract."""
    p = data.draw(st.integers(0, (k - 1) * d))
    k2 = data.draw(st.integers(1, 5))
    p2 = data.draw(st.integers(0, k2 - 1))
    src = nn.Sequential(nn.Conv1d(2, 3, k, stride=s, dilation=d, padding=p), nn.ReLU(),
                        nn.Conv1d(3, 2, k2, padding=p2)).to(DTYPE)
    co = cs.continual(src)
    rf = (k - 1) * d + 1 + (k2 - 1) * s
    assert co.receptive_field == rf
    assert co.stride == s
    assert co.padding == p + p2 * s
    assert co.delay == rf - 1 - (p + p2 * s)
    t = rf + 3 * s
    assert_streaming_equivalent(co, torch.randn(2, 2, t, dtype=DTYPE), src)


@pytest.mark.parametrize("mode", ["zeros", "replicate"])
@pytest.mark.parametrize("ndim", [1, 2, 3])
def test_conv_edge_geometry(ndim: int, mode: str) -> None:
    """The sweep's extremes: k=5, d=3, full padding, stride 3, grouped, shortest useful clip."""
    cls = getattr(nn, f"Conv{ndim}d")
    k = (5, *(3,) * (ndim - 1))
    src = cls(4, 4, k, stride=(3, *(1,) * (ndim - 1)), dilation=(3, *(1,) * (ndim - 1)),
              padding=(12, *(1,) * (ndim - 1)), groups=4, padding_mode=mode).to(DTYPE)
    co = cs.continual(src)
    assert co.delay == 0
    x = torch.randn(2, 4, 4, *(3,) * (ndim - 1), dtype=DTYPE)
    assert_streaming_equivalent(co, x, src)
