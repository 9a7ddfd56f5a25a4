"""The continual STFT equals torch.stft over the stream, stepped, chunked and flushed."""

from __future__ import annotations

import pytest
import torch

import costream as cs
from costream.audio import STFT, hops, waveform_of
from costream.testing import assert_streaming_equivalent

# (n_fft, hop, win_length, window): hop dividing n_fft // 2 or not, odd n_fft, short window
SETTINGS = [(8, 4, None, "hann"), (400, 160, None, "hann"), (512, 128, 400, "hamming"),
            (255, 64, None, "blackman"), (64, 64, None, "rectangular")]
HANN64 = torch.hann_window(64, dtype=torch.float64)
TOL = {torch.float64: 1e-10, torch.float32: 1e-4}


def _window(name, win_length, n_fft, dtype):
    make = {"hann": torch.hann_window, "hamming": torch.hamming_window,
            "blackman": torch.blackman_window, "rectangular": torch.ones}[name]
    win = make(win_length or n_fft, dtype=torch.float64)
    left = (n_fft - win.shape[0]) // 2  # torch.stft centres a short window
    return torch.nn.functional.pad(win, (left, n_fft - win.shape[0] - left)).to(dtype)


def _reference(wave, n_fft, hop, window, center, power=1.0):
    spec = torch.stft(wave, n_fft, hop, window=window, center=center, pad_mode="reflect",
                      return_complex=True).abs()
    return spec.pow(power)


def _atol(ref, dtype):
    return TOL[dtype] * max(1.0, float(ref.abs().max()))


@pytest.mark.parametrize("center", [True, False], ids=["center", "no-center"])
@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: f"{s[0]}-{s[1]}-{s[3]}")
def test_stepped_equals_torch_stft(setting, center, dtype) -> None:
    n_fft, hop, win_length, window = setting
    stft = STFT(n_fft, hop, win_length, window, center=center).to(dtype)
    wave = torch.randn(2, hop * 30, dtype=dtype)
    ref = _reference(wave, n_fft, hop, _window(window, win_length, n_fft, dtype), center)
    clip = hops(wave, hop)
    outs = [stft.forward_step(clip[:, :, t]) for t in range(clip.shape[2])]
    assert all(y is None for y in outs[:stft.delay])
    stepped = torch.stack(outs[stft.delay:], 2)
    atol = _atol(ref, dtype)
    torch.testing.assert_close(stepped, ref[:, :, :stepped.shape[2]], rtol=0, atol=atol)
    stft.reset_state()
    flushed = stft.forward_steps(clip, pad_end=True)
    torch.testing.assert_close(flushed, ref, rtol=0, atol=atol)
    torch.testing.assert_close(stft(clip), ref, rtol=0, atol=atol)
    assert stft.temporal.out_length(clip.shape[2]) == ref.shape[2]


@pytest.mark.parametrize("center", [True, False], ids=["center", "no-center"])
def test_streaming_contract(center) -> None:
    stft = STFT(64, 16, window="hann", center=center, power=2).double()
    clip = hops(torch.randn(3, 16 * 24, dtype=torch.float64), 16)
    assert_streaming_equivalent(
        stft, clip, lambda c: _reference(waveform_of(c), 64, 16, HANN64, center, 2))


@pytest.mark.parametrize("steps", [3, 4, 5, 6])
def test_short_centred_stream_flushes(steps) -> None:
    """Streams shorter than the ring (reflect padding at both ends from the same samples)."""
    stft = STFT(64, 16).double()
    wave = torch.randn(1, 16 * steps, dtype=torch.float64)
    got = stft.forward_steps(hops(wave, 16), pad_end=True)
    torch.testing.assert_close(got, _reference(wave, 64, 16, HANN64, True), rtol=0, atol=1e-10)


def test_centre_latency() -> None:
    """Reflection costs one hop where the hop divides n_fft // 2, none otherwise."""
    assert STFT(512, 128, center=False).delay == 3
    assert STFT(512, 128, center=True).delay == 2  # window alone: 1; mirror of sample 256: 2
    assert STFT(400, 160, center=True).delay == 1  # 200 is not a multiple of 160: no extra


def test_composes_with_a_network() -> None:
    tail = torch.nn.Sequential(torch.nn.Conv1d(33, 4, 3, padding=1), torch.nn.ReLU(),
                               torch.nn.Conv1d(4, 2, 3, stride=2)).double()
    net = cs.Sequential(STFT(64, 16), *cs.continual(tail)).double()
    clip = hops(torch.randn(2, 16 * 40, dtype=torch.float64), 16)
    assert_streaming_equivalent(
        net, clip, lambda c: tail(_reference(waveform_of(c), 64, 16, HANN64, True)))


def test_bad_input_is_one_readable_error() -> None:
    stft = STFT(64, 16)
    with pytest.raises(ValueError, match="hops"):
        stft(torch.randn(1, 15, 4))
    with pytest.raises(ValueError, match="16"):
        stft.forward_step(torch.randn(1, 15))
    with pytest.raises(ValueError, match="hop_length"):
        STFT(64, 65)
    with pytest.raises(ValueError, match="power"):
        STFT(64, 16, power=3)
    with pytest.raises(ValueError, match="whole number of hops"):
        hops(torch.randn(1, 17), 16)
    with pytest.raises(ValueError, match="n_fft // 2"):
        STFT(64, 16).forward_steps(torch.randn(1, 16, 2), pad_end=True)
