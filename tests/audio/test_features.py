"""Mel filterbanks, dB and MFCCs against librosa (a test-only reference)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from costream.audio import DCT, MelScale, ToDB, hops, mel_filters, mel_spectrogram, mfcc
from costream.testing import assert_streaming_equivalent

librosa = pytest.importorskip("librosa")

SR = 16000


@pytest.mark.parametrize("htk", [False, True], ids=["slaney", "htk"])
@pytest.mark.parametrize("norm", ["slaney", None], ids=["area", "peak"])
@pytest.mark.parametrize("n_fft,n_mels,f_min,f_max", [(512, 40, 0.0, None),
                                                      (400, 64, 20.0, 7600.0),
                                                      (2048, 128, 300.0, 4000.0)])
def test_mel_filters_equal_librosa(htk, norm, n_fft, n_mels, f_min, f_max) -> None:
    ref = librosa.filters.mel(sr=SR, n_fft=n_fft, n_mels=n_mels, fmin=f_min, fmax=f_max,
                              htk=htk, norm=norm, dtype=np.float64)
    got = mel_filters(SR, n_fft, n_mels, f_min, f_max, htk=htk, norm=norm, dtype=torch.float64)
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-9, atol=1e-12)


def _wave(seconds: float = 0.5) -> np.ndarray:
    rng = np.random.default_rng(0)
    t = np.arange(int(SR * seconds)) / SR
    return (np.sin(2 * np.pi * 440 * t) + 0.3 * rng.standard_normal(t.shape)).astype(np.float64)


@pytest.mark.parametrize("center", [True, False], ids=["center", "no-center"])
@pytest.mark.parametrize("htk", [False, True], ids=["slaney", "htk"])
def test_mfcc_equals_librosa(center, htk, dtype) -> None:
    y = _wave()
    # librosa's melspectrogram rounds its filterbank to float32: build it in float64 here
    power = np.abs(librosa.stft(y, n_fft=512, hop_length=160, center=center,
                                pad_mode="reflect")) ** 2
    mel = librosa.filters.mel(sr=SR, n_fft=512, n_mels=40, htk=htk, dtype=np.float64) @ power
    ref = librosa.feature.mfcc(S=librosa.power_to_db(mel, top_db=None), n_mfcc=13)
    front = mfcc(SR, 512, 160, n_mfcc=13, n_mels=40, center=center, htk=htk).to(dtype)
    clip = hops(torch.from_numpy(y).to(dtype)[None], 160)
    stepped = front.forward_steps(clip, pad_end=True)[0].double().numpy()
    atol = {torch.float64: 1e-7, torch.float32: 2e-2}[dtype]  # dB of float32 spectra
    np.testing.assert_allclose(stepped, ref, rtol=0, atol=atol)
    db = mel_spectrogram(SR, 512, 160, 40, center=center, htk=htk).to(dtype)
    got_db = db.forward_steps(clip, pad_end=True)[0].double().numpy()
    np.testing.assert_allclose(got_db, librosa.power_to_db(mel, top_db=None), rtol=0, atol=atol)


def test_frame_maps_stream() -> None:
    from scipy.fft import dct

    x = torch.rand(2, 257, 7, dtype=torch.float64) + 1e-3
    fb = torch.from_numpy(librosa.filters.mel(sr=SR, n_fft=512, n_mels=40, dtype=np.float64))
    cases = [(MelScale(257, SR, 40), lambda c: torch.einsum("mf,bft->bmt", fb, c)),
             (ToDB(), lambda c: 10 * torch.log10(c)),
             (DCT(257, 20),
              lambda c: torch.from_numpy(dct(c.numpy(), axis=1, norm="ortho")[:, :20]))]
    for module, reference in cases:
        assert_streaming_equivalent(module.double(), x, reference)


def test_bad_settings() -> None:
    with pytest.raises(ValueError, match="norm"):
        mel_filters(SR, 512, norm="l2")
    with pytest.raises(ValueError, match="f_min"):
        mel_filters(SR, 512, f_min=9000.0)
    with pytest.raises(ValueError, match="n_out"):
        DCT(10, 11)
    with pytest.raises(ValueError, match="MelScale expects"):
        MelScale(257, SR)(torch.rand(1, 100, 3))
