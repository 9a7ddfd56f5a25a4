"""MACs (ptflops convention) and parameter counts against the Co3D paper (arXiv 2106.00050).

Counted on ``meta`` tensors at the published input sizes (nothing is computed). Continual
models are counted per step; for CoI3D, whose temporal pooling makes it predict every second
frame, the paper counts an emitting step (``per="peak"``).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from costream.bench import ptflops_macs, ptflops_step_macs
from costream.models import create_model, list_models

# offline model: (params in M, GMACs per clip, continual model, GMACs per step)
PAPER = {
    "x3d_xs": (3.79, 0.64, None, None),
    "x3d_s": (3.79, 2.06, "cox3d_s", 0.17),
    "x3d_m": (3.79, 4.97, "cox3d_m", 0.33),
    "x3d_l": (6.15, 19.17, "cox3d_l", 1.25),
    "slow_r50": (32.45, 54.87, "coslow_r50", 6.90),
    "i3d_r50": (28.04, 28.61, "coi3d_r50", 5.68),
}


def on_meta(name: str, **kwargs) -> nn.Module:
    return create_model(name, **kwargs).to("meta")


def clip_macs(model: nn.Module) -> int:
    return ptflops_macs(model, torch.empty(1, *model.input_shape, device="meta"))


def step_macs(model: nn.Module, per: str = "step") -> float:
    c, _, h, w = model.input_shape
    return ptflops_step_macs(model, torch.empty(1, c, h, w, device="meta"), per=per)


@pytest.mark.parametrize("name", list(PAPER))
def test_clip_macs_and_params_match_the_paper(name: str) -> None:
    params, gmacs, _, _ = PAPER[name]
    model = on_meta(name)
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(params, abs=0.006)
    assert clip_macs(model) / 1e9 == pytest.approx(gmacs, rel=0.05)


@pytest.mark.parametrize("name", [n for n, row in PAPER.items() if row[2]])
def test_step_macs_match_the_paper(name: str) -> None:
    params, _, continual, gmacs = PAPER[name]
    model = on_meta(continual)
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(params, abs=0.006)
    assert step_macs(model, per="peak") / 1e9 == pytest.approx(gmacs, rel=0.05)
    # the extended receptive field (64-frame head window) costs the same per step
    assert step_macs(on_meta(continual, head_pool=64), per="peak") == pytest.approx(
        step_macs(model, per="peak"), rel=1e-3)


@pytest.mark.parametrize("name", list_models(family="video"))
def test_every_model_is_counted(name: str) -> None:
    """A step costs one frame's share of the clip (for X3D: of its frame-scope twin)."""
    model = on_meta(name)
    clip = clip_macs(model)
    assert clip > 0
    if not model.streamable:
        model = on_meta(name, se_scope="frame")
    frames = model.clip_length  # input frames per clip; every step is one input frame
    assert step_macs(model) * frames == pytest.approx(clip, rel=0.03)


@pytest.mark.parametrize("name", ["cox3d_xs", "coi3d_r50"])
def test_meta_count_equals_the_executed_steps(name: str) -> None:
    """The pure step on meta tensors counts what ``forward_step`` executes in steady state."""
    model = create_model(name, head_pool=2, crop_size=32)
    meta = on_meta(name, head_pool=2, crop_size=32)
    frame = torch.randn(1, 3, 32, 32)
    executed = {per: ptflops_step_macs(model, frame, per=per) for per in ("step", "peak", "output")}
    counted = {per: ptflops_step_macs(meta, frame.to("meta"), per=per) for per in executed}
    assert executed == counted
    strided = name == "coi3d_r50"  # one prediction per two frames
    assert math.isclose(executed["output"], 2 * executed["step"]) == strided


def test_counts_agree_with_and_without_inference_mode() -> None:
    """Composite operations reach the counter undecomposed under inference mode only."""
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.SiLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()
    x = torch.randn(2, 3, 6, 6)
    with torch.inference_mode():
        fast = ptflops_macs(net, x)
    expected = (2 * 8 * 36) * (3 * 9 + 1) + 2 * (2 * 8 * 36) + 2 * 8 * 36 + 2 * 8 * 36 + 2 * 4 * 9
    assert ptflops_macs(net, x) == fast == expected
