"""MAC counting of costream.bench: executed per step, theoretical per output frame."""

from __future__ import annotations

import doctest
import subprocess
import sys

import pytest
import torch
from torch import nn

import costream
from costream.bench import _macs, count_macs, step_macs, theoretical_step_macs


def conv_macs(conv: nn.modules.conv._ConvNd, out_spatial: tuple[int, ...] = ()) -> int:
    """MACs of one output frame of ``conv``, from its shape alone."""
    per_position = conv.out_channels * conv.in_channels // conv.groups
    for k in conv.kernel_size:
        per_position *= k
    for s in out_spatial:
        per_position *= s
    return per_position


def test_count_macs_linear_and_pointwise() -> None:
    lin = nn.Linear(5, 7)
    assert count_macs(lin, torch.randn(3, 5)) == 3 * 5 * 7
    assert count_macs(torch.relu, torch.randn(10)) == 0


def test_conv1d_step_is_one_output_frame() -> None:
    conv = nn.Conv1d(4, 8, 3, padding=1)
    expected = 8 * 4 * 3
    assert step_macs(costream.continual(conv), torch.randn(1, 4)) == expected
    assert theoretical_step_macs(conv, torch.randn(1, 4, 10)) == expected


@pytest.mark.parametrize(
    "kwargs",
    [
        {"padding": 0},
        {"padding": 2, "dilation": 2},
        {"padding": 1, "groups": 2},
        {"padding": 1, "bias": False},
    ],
    ids=["unpadded", "dilated", "grouped", "no_bias"],
)
def test_conv1d_variants(kwargs: dict) -> None:
    conv = nn.Conv1d(4, 8, 3, **kwargs)
    expected = conv_macs(conv)
    assert step_macs(costream.continual(conv), torch.randn(1, 4)) == expected
    assert theoretical_step_macs(conv, torch.randn(1, 4, 12)) == expected


@pytest.mark.parametrize("stride", [2, 3])
def test_temporal_stride_period_costs_one_output_frame(stride: int) -> None:
    conv = nn.Conv1d(4, 8, 3, stride=stride, padding=1)
    expected = 8 * 4 * 3
    assert theoretical_step_macs(conv, torch.randn(1, 4, 12)) == expected
    # one period of `stride` input frames produces one output frame
    assert step_macs(costream.continual(conv), torch.randn(1, 4), steps=stride) == expected


def test_conv3d_stack_matches_theory_and_hand_count() -> None:
    torch.manual_seed(0)
    convs = [nn.Conv3d(3, 4, 3, stride=(1, 2, 2), padding=1),
             nn.Conv3d(4, 6, 3, padding=(1, 1, 1)),
             nn.Conv3d(6, 5, (2, 3, 3), padding=(0, 1, 1))]
    model = nn.Sequential(convs[0], nn.BatchNorm3d(4), nn.ReLU(), convs[1], nn.ReLU(),
                          convs[2]).eval()
    clip = torch.randn(1, 3, 6, 16, 16)
    hand = conv_macs(convs[0], (8, 8)) + conv_macs(convs[1], (8, 8)) + conv_macs(convs[2], (8, 8))
    theory = theoretical_step_macs(model, clip)
    assert theory == hand
    assert step_macs(costream.continual(model), clip[:, :, 0]) == theory


def test_theory_counts_layers_without_time_once() -> None:
    conv, head = nn.Conv1d(4, 8, 3), nn.Linear(8, 5)
    model = nn.Sequential(conv, nn.AdaptiveAvgPool1d(1), nn.Flatten(), head)
    assert theoretical_step_macs(model, torch.randn(2, 4, 9)) == 2 * (8 * 4 * 3 + 8 * 5)


def test_step_macs_counts_several_steps_and_resets() -> None:
    net = costream.continual(nn.Sequential(nn.Conv1d(2, 3, 3, padding=1), nn.ReLU(),
                                           nn.Conv1d(3, 4, 5, padding=2)))
    frame = torch.randn(1, 2)
    one = 3 * 2 * 3 + 4 * 3 * 5
    assert step_macs(net, frame) == one
    assert step_macs(net, frame, steps=3) == 3 * one
    assert net.get_state() is None
    with pytest.raises(ValueError):
        step_macs(net, frame, steps=0)


def test_step_macs_of_the_anchor() -> None:
    continual = pytest.importorskip("continual")
    conv = continual.Conv1d(4, 8, 3, padding=1)
    # the anchor convolves the new frame padded with k - 1 zeros: k output positions
    assert step_macs(conv, torch.randn(1, 4)) == 3 * 8 * 4 * 3


def test_docstring_examples() -> None:
    for mod in (_macs, sys.modules["costream.bench"]):
        result = doctest.testmod(mod)
        assert result.attempted > 0
        assert result.failed == 0


def test_import_costream_does_not_import_bench() -> None:
    code = "import sys, costream; sys.exit('costream.bench' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


# ------------------------------------------------------------------ attention in the ptflops count
def _attention_macs(b: int, length: int, e: int, h: int, ffn: int | None) -> int:
    """Hand count: projections, scaled q and k, Q K^T, softmax, A V, output projection
    (and for an encoder layer two residual sums, two affine layer norms, the feed-forward)."""
    tokens, dh = b * length, e // h
    attention = (3 * tokens * (e * e + e) + tokens * (e * e + e)
                 + b * h * (2 * length * dh + length * length * (2 * dh + 1)))
    if ffn is None:
        return attention
    return attention + 2 * tokens * e + 4 * tokens * e + tokens * (2 * e * ffn + ffn + e + ffn)


@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize("inference", [False, True])
def test_attention_is_counted_on_every_path(device: str, inference: bool) -> None:
    """Fused inference kernels (SDPA, MHA and encoder-layer fast paths) count like the
    decomposition seen with autograd on."""
    from costream.bench import PtflopsCounter

    b, length, e, h, ffn = 2, 5, 16, 4, 32
    x = torch.randn(b, length, e, device=device)
    mha = nn.MultiheadAttention(e, h, batch_first=True).eval().to(device)
    layer = nn.TransformerEncoderLayer(e, h, ffn, dropout=0.0, batch_first=True).eval().to(device)
    with torch.inference_mode(inference):
        with PtflopsCounter() as counter:
            mha(x, x, x, need_weights=False)
        assert counter.total == _attention_macs(b, length, e, h, None)
        with PtflopsCounter() as counter:
            layer(x)
        assert counter.total == _attention_macs(b, length, e, h, ffn)
