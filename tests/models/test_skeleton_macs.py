"""MACs and parameters of the skeleton zoo against the CoST-GCN paper (arXiv 2203.11009).

Counted on ``meta`` tensors at the published input: 300 frames, 25 joints, 2 persons. The
paper's ptflops counts hooked modules (convolutions, linear layers, norms, activations, pools);
the products with the graph adjacency and the attention products are functional calls it does
not see. ``paper_macs`` therefore leaves the matrix-product operations (``mm``, ``bmm``,
``matmul``) out; the 1x1 convolutions of this implementation run as ``addmm`` / ``baddbmm`` and
stay in. The full count (what runs) is checked separately against the formula for the
adjacency products.

Continual models are counted per prediction with the pure ``step`` (``per="output"``): for the
strided versions it computes every tap of the stride-2 temporal convolutions at every frame, the
convention the paper's CoST-GCN and CoAGCN figures follow; ``forward_step`` in steady state
skips the taps of outputs a stride drops (checked at the end).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from costream.bench import PtflopsCounter, count_macs, ptflops_macs, ptflops_step_macs
from costream.models import create_model, list_models
from costream.modules._onednn import ONEDNN_LINEAR, onednn_linear

MATMUL = ("mm", "bmm", "matmul")
# offline: params (M), GMACs per 300-frame clip; continual: GMACs per prediction
PAPER_OFFLINE = {"st_gcn": (3.14, 16.73), "agcn": (3.47, 18.69), "s_tr": (3.09, 16.14)}
PAPER_CONTINUAL = {"cost_gcn_star": ("st_gcn", 0.16), "coagcn_star": ("agcn", 0.17),
                   "cos_tr_star": ("s_tr", 0.15), "cost_gcn": ("st_gcn", 0.27),
                   "coagcn": ("agcn", 0.30), "cos_tr": ("s_tr", 0.22)}
PAPER_REDUCTION = {"cost_gcn_star": 107.7, "coagcn_star": 108.8, "cos_tr_star": 107.6}
FRAME = (1, 3, 25, 2)
CLIP = (1, 3, 300, 25, 2)


def on_meta(name: str, **kwargs) -> nn.Module:
    return create_model(name, **kwargs).to("meta")


def counted(fn, *args) -> PtflopsCounter:
    with torch.no_grad(), PtflopsCounter() as counter:
        fn(*args)
    return counter


def paper_macs(counter: PtflopsCounter) -> int:
    return counter.total - sum(counter.by_op[op] for op in MATMUL)


def step_counts(model: nn.Module, frame: torch.Tensor) -> tuple[float, float]:
    """(all MACs, paper-convention MACs) per prediction of the pure step from a fresh state."""
    state = model.init_state(frame.shape[0], tuple(frame.shape[1:]), device=frame.device,
                             dtype=frame.dtype)
    total = paper = outputs = 0
    for _ in range(model.temporal.stride):
        with torch.no_grad(), PtflopsCounter() as counter:
            y, state = model.step(frame, state)
        total += counter.total
        paper += paper_macs(counter)
        outputs += y is not None
    return total / outputs, paper / outputs


@pytest.mark.parametrize("name", list(PAPER_OFFLINE))
def test_clip_macs_and_params_match_the_paper(name: str) -> None:
    params, gmacs = PAPER_OFFLINE[name]
    model = on_meta(name)
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(params, abs=0.005)
    counter = counted(model, torch.empty(CLIP, device="meta"))
    assert paper_macs(counter) / 1e9 == pytest.approx(gmacs, rel=0.05)


def test_adjacency_products_are_counted_in_full() -> None:
    """ST-GCN's only matrix products are ``x @ A_k``: K * C_in * T * M * V^2 per block."""
    counter = counted(on_meta("st_gcn"), torch.empty(CLIP, device="meta"))
    # input widths and frames of the ten graph convolutions (blocks 5 and 8 stride after it)
    widths = (3, 64, 64, 64, 64, 128, 128, 128, 256, 256)
    frames = (300,) * 5 + (150,) * 3 + (75,) * 2
    expected = sum(3 * c * t * 2 * 25 * 25 for c, t in zip(widths, frames))
    assert sum(counter.by_op[op] for op in MATMUL) == expected


@pytest.mark.parametrize("name", list(PAPER_CONTINUAL))
def test_step_macs_match_the_paper(name: str, request: pytest.FixtureRequest) -> None:
    if name == "cos_tr":
        request.applymarker(pytest.mark.xfail(strict=True, reason=(
            "the paper's 0.22 G for CoS-TR does not follow the convention of its CoST-GCN and "
            "CoAGCN rows (0.27 / 0.30, matched here): counted alike, CoS-TR costs 0.265 G; "
            "0.22 G is its stride-skipping forward_step cost (0.218 G)")))
    offline, gmacs = PAPER_CONTINUAL[name]
    model = on_meta(name)
    params = sum(p.numel() for p in model.parameters())
    assert params == sum(p.numel() for p in on_meta(offline).parameters())
    assert params / 1e6 == pytest.approx(PAPER_OFFLINE[offline][0], abs=0.005)
    _, paper = step_counts(model, torch.empty(FRAME, device="meta"))
    assert paper / 1e9 == pytest.approx(gmacs, rel=0.05)


@pytest.mark.parametrize("name", list(PAPER_REDUCTION))
def test_star_reduction_matches_the_paper(name: str) -> None:
    offline, ratio = PAPER_CONTINUAL[name][0], PAPER_REDUCTION[name]
    clip = paper_macs(counted(on_meta(offline), torch.empty(CLIP, device="meta")))
    _, step = step_counts(on_meta(name), torch.empty(FRAME, device="meta"))
    assert clip / step == pytest.approx(ratio, rel=0.05)


@pytest.mark.parametrize("name", [n for n in list_models(family="skeleton") if "star" in n])
def test_star_step_costs_one_more_frame_of_the_clip(name: str) -> None:
    """Without strides or padding a step is the marginal cost of one frame of a long clip
    (up to the partial-sum additions of the continual convolutions: well under 1 %)."""
    model = on_meta(name)
    clip = [ptflops_macs(model, torch.empty(1, 3, t, 25, 2, device="meta")) for t in (300, 301)]
    step = ptflops_step_macs(model, torch.empty(FRAME, device="meta"))
    assert step == pytest.approx(clip[1] - clip[0], rel=0.01)
    assert step >= clip[1] - clip[0]


@pytest.mark.parametrize("name", ["cost_gcn", "coagcn_star"])
def test_forward_step_executes_the_theoretical_cost(name: str) -> None:
    """In steady state ``forward_step`` does one output's work per layer: for the strided
    networks, 4 more frames of a padded clip cost what one prediction costs. The pure step
    (meta count) computes every tap of the strided convolutions instead."""
    options = {"clip_length": 84 if "star" in name else 8}
    model = create_model(name, **options)
    executed = ptflops_step_macs(model, torch.randn(FRAME), per="output")
    model.to("meta")
    stride = model.temporal.stride
    clip = [ptflops_macs(model, torch.empty(1, 3, t, 25, 2, device="meta"))
            for t in (96, 96 + stride)]
    assert executed == pytest.approx(clip[1] - clip[0], rel=0.01)
    pure = ptflops_step_macs(model, torch.empty(FRAME, device="meta"), per="output")
    if stride == 1:
        assert pure == executed
    else:
        assert pure > 1.15 * executed


@pytest.mark.skipif(ONEDNN_LINEAR is None, reason="torch built without oneDNN")
def test_the_onednn_frame_linear_is_counted() -> None:
    """Float32 inference steps products with oneDNN's linear; both MAC counters see it."""
    rows, weight, bias = torch.randn(50, 64), torch.randn(576, 64), torch.randn(576)
    with torch.inference_mode(), PtflopsCounter() as counter:
        y = onednn_linear(rows, weight, bias)
    assert counter.by_op["_linear_pointwise"] == counter.total == 50 * 576 * 64 + 50 * 576
    with torch.inference_mode():
        assert count_macs(onednn_linear, rows, weight, bias) == 50 * 576 * 64
    torch.testing.assert_close(y, rows @ weight.T + bias, rtol=1e-5, atol=1e-4)
