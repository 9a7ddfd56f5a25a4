"""Ready-made continual front-ends: log-mel spectrograms and MFCCs as one ``Sequential``."""

from __future__ import annotations

from torch import Tensor

from ..modules import Sequential
from ._db import ToDB
from ._dct import DCT
from ._mel import MelScale
from ._stft import STFT


def mel_spectrogram(sample_rate: int, n_fft: int, hop_length: int, n_mels: int = 128, *,
                    win_length: int | None = None, window: str | Tensor = "hann",
                    center: bool = True, power: float = 2.0, f_min: float = 0.0,
                    f_max: float | None = None, htk: bool = False, norm: str | None = "slaney",
                    db: bool = True, amin: float = 1e-10) -> Sequential:
    """A continual (log-)mel spectrogram: :class:`STFT`, :class:`MelScale` and :class:`ToDB`.

    With ``db=True`` it equals ``librosa.power_to_db(librosa.feature.melspectrogram(...),
    top_db=None)`` for the same settings (``pad_mode="reflect"``).

    Shape:
        step: ``(B, hop_length)`` samples -> ``(B, n_mels)``; clip: ``(B, hop_length, T)`` or
        ``(B, samples)`` -> ``(B, n_mels, T_out)``.

    Example:
        >>> import torch
        >>> from costream.audio import hops, mel_spectrogram
        >>> front = mel_spectrogram(16000, 400, 160, n_mels=40)
        >>> clip = hops(torch.randn(1, 16000), 160)
        >>> torch.allclose(front.forward_steps(clip, pad_end=True), front(clip), atol=1e-3)
        True
    """
    layers = [STFT(n_fft, hop_length, win_length, window, center, power),
              MelScale(n_fft // 2 + 1, sample_rate, n_mels, f_min, f_max, htk, norm)]
    if db:
        layers.append(ToDB(amin=amin, multiplier=10.0 if power == 2 else 20.0))
    return Sequential(*layers)


def mfcc(sample_rate: int, n_fft: int, hop_length: int, n_mfcc: int = 20, n_mels: int = 128,
         **kwargs) -> Sequential:
    """A continual MFCC front-end: :func:`mel_spectrogram` (in dB) followed by a :class:`DCT`.

    It equals ``librosa.feature.mfcc(S=librosa.power_to_db(mel, top_db=None), n_mfcc=n_mfcc)``
    for the mel spectrogram ``mel`` of the same settings. ``kwargs`` go to
    :func:`mel_spectrogram`.

    Example:
        >>> import torch
        >>> from costream.audio import mfcc
        >>> front = mfcc(16000, 512, 160, n_mfcc=13, n_mels=40)
        >>> [front.forward_step(torch.randn(1, 160)) is None for _ in range(3)]
        [True, False, False]
    """
    front = mel_spectrogram(sample_rate, n_fft, hop_length, n_mels, **kwargs)
    return Sequential(*front, DCT(n_mels, n_mfcc))
