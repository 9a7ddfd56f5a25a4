"""Workloads of the sweep benchmark: TCNs, 3D CNNs and Transformer encoders drawn from a seed.

Each workload is a ``torch.nn`` model with seeded weights, a window clip, costream's
conversion and the continual-inference 1.2.4 network with the same weights (the anchor).
Continual-inference has no temporal dilation: for a dilated TCN layer the anchor holds the
equivalent dense kernel (zeros between the taps), which gives the same outputs at the cost of
``(k - 1) * d + 1`` taps instead of ``k``; such workloads are flagged ``dense_anchor``.
Its ``TransformerEncoder`` cannot be built with more than 2 layers (an assertion in its
``RetroactiveLambda``): those encoders have no anchor and are compared with the window only.
"""

from __future__ import annotations

import random
import warnings
from dataclasses import dataclass, field
from typing import Any

import continual
import torch
from torch import Tensor, nn
from transformer import _torch_key

import costream
from core import _randomise_batchnorm, make_anchor

FAMILIES = ("tcn", "cnn3d", "transformer")


@dataclass(frozen=True)
class Spec:
    """One drawn workload: its family, a short name and the architecture parameters."""

    family: str
    name: str
    params: dict[str, Any] = field(hash=False)

    def describe(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.params.items())


# ---------------------------------------------------------------------------- drawing
def _tcn_spec(rng: random.Random, i: int) -> Spec:
    residual = rng.random() < 0.5
    c = rng.choice([32, 48, 64, 96, 128, 192, 256, 384, 512])
    layers = rng.randint(4, 12)
    k = rng.randint(2, 7)
    dil = [rng.randint(1, 4) for _ in range(layers)]
    if residual:  # symmetric "same" padding needs an even (k - 1) * d
        dil = [d if d * (k - 1) % 2 == 0 else d + 1 for d in dil]  # d odd <= 3: d + 1 <= 4
    return Spec("tcn", f"tcn{i:02d}", {"channels": c, "kernel": k, "layers": layers,
                                      "dilations": dil, "residual": residual})


def _cnn_spec(rng: random.Random, i: int) -> Spec:
    layers = rng.randint(3, 6)
    px = rng.choice([32, 48, 64, 96, 112, 128])
    kt = rng.choice([3, 5])
    bn = rng.random() < 0.7
    chans, strides = [], []
    c = rng.choice([16, 24, 32])
    for j in range(layers):
        c = min(96, max(c, rng.choice([16, 24, 32, 48, 64, 96]))) if j else c
        chans.append(c)
        strides.append(2 if j == 0 or (j < 3 and rng.random() < 0.5) else 1)
    return Spec("cnn3d", f"cnn{i:02d}", {"channels": chans, "frame_px": px, "kernel_t": kt,
                                         "spatial_strides": strides, "batch_norm": bn})


def _transformer_spec(rng: random.Random, i: int) -> Spec:
    d = rng.choice([128, 192, 256, 384, 512, 768])
    heads = rng.choice([h for h in (2, 3, 4, 6, 8, 12) if d % h == 0])
    return Spec("transformer", f"trf{i:02d}", {"d": d, "heads": heads, "ff": 2 * d,
                                               "window": rng.choice([16, 32, 48, 64, 96, 128]),
                                               "layers": rng.randint(1, 4)})


def step_cost(spec: Spec) -> float:
    """Rough MACs of one costream step (to keep a full sweep within minutes)."""
    p = spec.params
    if spec.family == "tcn":
        return p["layers"] * p["channels"] ** 2 * p["kernel"]
    if spec.family == "cnn3d":
        px, cin, total = p["frame_px"], 3, 0.0
        for c, s in zip(p["channels"], p["spatial_strides"]):
            px //= s
            total += cin * c * 9 * p["kernel_t"] * px * px
            cin = c
        return total
    d, n, layers = p["d"], p["window"], p["layers"]
    return 6 * d * d + (layers - 1) * n * 6 * d * d


def draw(seed: int, counts: dict[str, int], max_step_macs: float = 4e8) -> list[Spec]:
    """``counts[family]`` workloads per family from ``random.Random(seed)``; draws whose step
    would exceed ``max_step_macs`` are redrawn."""
    rng = random.Random(seed)
    makers = {"tcn": _tcn_spec, "cnn3d": _cnn_spec, "transformer": _transformer_spec}
    out = []
    for fam in FAMILIES:
        i = 0
        while i < counts.get(fam, 0):
            spec = makers[fam](rng, len(out))
            if step_cost(spec) <= max_step_macs:
                out.append(spec)
                i += 1
    return out


QUICK = [
    Spec("tcn", "tcn_tiny", {"channels": 16, "kernel": 3, "layers": 3, "dilations": [1, 2, 1],
                             "residual": True}),
    Spec("cnn3d", "cnn_tiny", {"channels": [8, 8], "frame_px": 16, "kernel_t": 3,
                               "spatial_strides": [2, 1], "batch_norm": True}),
    Spec("transformer", "trf_tiny", {"d": 16, "heads": 2, "ff": 32, "window": 6, "layers": 1}),
]


# ---------------------------------------------------------------------------- building
class _Block(nn.Module):
    """Residual TCN block: ``x + relu(conv(x))`` with symmetric padding."""

    def __init__(self, c: int, k: int, d: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(c, c, k, dilation=d, padding=d * (k - 1) // 2)
        self.act = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return x + self.act(self.conv(x))


def _dense_conv(conv: nn.Conv1d) -> continual.Conv1d:
    """The anchor's Conv1d equal to ``conv`` (a dilated kernel spread out with zeros)."""
    d, k = conv.dilation[0], conv.kernel_size[0]
    out = continual.Conv1d(conv.in_channels, conv.out_channels, (k - 1) * d + 1,
                           padding=conv.padding, bias=conv.bias is not None)
    with torch.no_grad():
        out.weight.zero_()
        out.weight[:, :, ::d] = conv.weight
        if conv.bias is not None:
            out.bias.copy_(conv.bias)
    return out.eval()


def _tcn(p: dict[str, Any]) -> tuple[nn.Module, nn.Module]:
    c, k = p["channels"], p["kernel"]
    if p["residual"]:
        model = nn.Sequential(*[_Block(c, k, d) for d in p["dilations"]])
        anchor = continual.Sequential(*[
            continual.Residual(continual.Sequential(_dense_conv(b.conv), nn.ReLU()))
            for b in model])
    else:
        layers: list[nn.Module] = []
        for j, d in enumerate(p["dilations"]):
            layers.append(nn.Conv1d(c, c, k, dilation=d))
            if j < len(p["dilations"]) - 1:
                layers.append(nn.ReLU())
        model = nn.Sequential(*layers)
        anchor = continual.Sequential(*[_dense_conv(m) if isinstance(m, nn.Conv1d) else m
                                        for m in model])
    return model, anchor


def _cnn3d(p: dict[str, Any]) -> nn.Module:
    layers: list[nn.Module] = []
    cin = 3
    for c, s in zip(p["channels"], p["spatial_strides"]):
        kt = p["kernel_t"]
        layers.append(nn.Conv3d(cin, c, (kt, 3, 3), stride=(1, s, s), padding=(kt // 2, 1, 1)))
        if p["batch_norm"]:
            layers.append(nn.BatchNorm3d(c))
        layers.append(nn.ReLU())
        cin = c
    return nn.Sequential(*layers)


def _encoder(p: dict[str, Any]) -> tuple[nn.Module, nn.Module | None]:
    layer = nn.TransformerEncoderLayer(p["d"], p["heads"], p["ff"], dropout=0.0,
                                       batch_first=True)
    model = nn.TransformerEncoder(layer, p["layers"], enable_nested_tensor=False).eval()
    if p["layers"] > 2:  # continual-inference 1.2.4 fails to build it (closure.py assertion)
        return model, None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        factory = continual.TransformerEncoderLayerFactory(
            d_model=p["d"], nhead=p["heads"], dim_feedforward=p["ff"], dropout=0.0,
            sequence_len=p["window"])
        anchor = continual.TransformerEncoder(factory, num_layers=p["layers"]).eval()
        src = model.state_dict()
        anchor.load_state_dict({k: src[_torch_key(k)] for k in anchor.state_dict()})
    return model, anchor


def build(spec: Spec, seed: int = 0) -> dict[str, Any]:
    """The workload's torch model, window clip, costream network and anchor (eval mode)."""
    p = spec.params
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    dense_anchor = False
    if spec.family == "tcn":
        model, anchor = _tcn(p)
        rf = 1 + sum((p["kernel"] - 1) * d for d in p["dilations"])
        clip = torch.randn(1, p["channels"], rf + 8, generator=gen)
        dense_anchor = any(d > 1 for d in p["dilations"])
        co_net = costream.continual(model.eval())
    elif spec.family == "cnn3d":
        model = _cnn3d(p)
        _randomise_batchnorm(model, gen)
        model.eval()
        anchor, _ = make_anchor(model)
        t = len(p["channels"]) * (p["kernel_t"] - 1) + 3
        clip = torch.randn(1, 3, t, p["frame_px"], p["frame_px"], generator=gen)
        co_net = costream.continual(model)
    else:
        model, anchor = _encoder(p)
        clip = torch.randn(1, p["d"], p["window"] + 8, generator=gen)
        co_net = costream.continual(model, temporal_window=p["window"])
    return {"model": model.eval(), "clip": clip, "costream": co_net.eval(),
            "anchor": None if anchor is None else anchor.eval(), "dense_anchor": dense_anchor}
