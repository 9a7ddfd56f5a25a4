"""Mel filterbanks (HTK and Slaney scales and norms) and the continual :class:`MelScale`.

The Slaney scale is linear below 1 kHz and logarithmic above (Slaney's Auditory Toolbox, 1998);
the HTK scale is ``2595 log10(1 + f / 700)`` (Young et al., The HTK Book). Filters are triangles
between consecutive mel-spaced edges, evaluated at the FFT bin frequencies; ``norm="slaney"``
scales each triangle to unit area (constant energy per band).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..modules._frame import _FrameMap
from ._exact import constant_as, register_constant

_F_SP = 200.0 / 3  # Slaney: Hz per mel below the break
_BREAK_HZ = 1000.0
_LOGSTEP = math.log(6.4) / 27.0  # Slaney: log-frequency step per mel above the break


def hz_to_mel(hz: Tensor, htk: bool = False) -> Tensor:
    """Frequencies in Hz to mels on the HTK or the Slaney scale.

    Example:
        >>> import torch
        >>> from costream.audio import hz_to_mel
        >>> hz_to_mel(torch.tensor([0.0, 1000.0]), htk=False)
        tensor([ 0., 15.])
    """
    if htk:
        return 2595.0 * torch.log10(1.0 + hz / 700.0)
    brk = _BREAK_HZ / _F_SP
    return torch.where(hz >= _BREAK_HZ,
                       brk + torch.log(hz.clamp_min(_BREAK_HZ) / _BREAK_HZ) / _LOGSTEP,
                       hz / _F_SP)


def mel_to_hz(mel: Tensor, htk: bool = False) -> Tensor:
    """Mels on the HTK or the Slaney scale to Hz (inverse of :func:`hz_to_mel`).

    Example:
        >>> import torch
        >>> from costream.audio import mel_to_hz
        >>> mel_to_hz(torch.tensor([15.0]), htk=False)
        tensor([1000.])
    """
    if htk:
        return 700.0 * (10.0 ** (mel / 2595.0) - 1.0)
    brk = _BREAK_HZ / _F_SP
    return torch.where(mel >= brk, _BREAK_HZ * torch.exp(_LOGSTEP * (mel - brk)), mel * _F_SP)


def mel_filters(sample_rate: int, n_fft: int, n_mels: int = 128, f_min: float = 0.0,
                f_max: float | None = None, htk: bool = False, norm: str | None = "slaney",
                dtype: torch.dtype = torch.float32) -> Tensor:
    """A mel filterbank ``(n_mels, n_fft // 2 + 1)`` (computed in float64, returned in ``dtype``).

    Args:
        sample_rate: sampling rate in Hz.
        n_fft: FFT size of the spectrogram it applies to.
        n_mels: number of mel bands.
        f_min, f_max: frequency range in Hz (``f_max`` defaults to ``sample_rate / 2``).
        htk: the HTK mel scale instead of Slaney's.
        norm: ``"slaney"`` (unit-area triangles) or ``None`` (peak 1).

    Example:
        >>> from costream.audio import mel_filters
        >>> fb = mel_filters(16000, 512, n_mels=40)
        >>> fb.shape, bool((fb >= 0).all())
        (torch.Size([40, 257]), True)
    """
    if norm not in (None, "slaney"):
        raise ValueError(f"norm must be 'slaney' or None, got {norm!r}")
    f_max = sample_rate / 2.0 if f_max is None else float(f_max)
    if not 0.0 <= f_min < f_max:
        raise ValueError(f"need 0 <= f_min < f_max, got f_min={f_min}, f_max={f_max}")
    d = torch.float64
    freqs = torch.linspace(0.0, sample_rate / 2.0, n_fft // 2 + 1, dtype=d)
    lo, hi = hz_to_mel(torch.tensor(f_min, dtype=d), htk), hz_to_mel(torch.tensor(f_max, dtype=d),
                                                                      htk)
    edges = mel_to_hz(torch.linspace(float(lo), float(hi), n_mels + 2, dtype=d), htk)
    width = edges.diff()  # (n_mels + 1,)
    rel = edges[:, None] - freqs[None, :]  # edge minus bin frequency
    rising = -rel[:-2] / width[:-1, None]
    falling = rel[2:] / width[1:, None]
    fb = torch.minimum(rising, falling).clamp_min(0.0)
    if norm == "slaney":
        fb = fb * (2.0 / (edges[2:] - edges[:-2]))[:, None]
    return fb.to(dtype)


class MelScale(_FrameMap):
    """Continual mel projection of spectrum frames (stateless: one frame in, one frame out).

    Args:
        n_freq: input frequency bins (``n_fft // 2 + 1``).
        sample_rate, n_mels, f_min, f_max, htk, norm: as for :func:`mel_filters`.

    Shape:
        step: ``(B, n_freq)`` -> ``(B, n_mels)``; clip: ``(B, n_freq, T)`` -> ``(B, n_mels, T)``.

    Example:
        >>> import torch
        >>> from costream.audio import MelScale
        >>> mel = MelScale(257, 16000, n_mels=40)
        >>> mel(torch.rand(2, 257, 5)).shape, mel.forward_step(torch.rand(2, 257)).shape
        (torch.Size([2, 40, 5]), torch.Size([2, 40]))
    """

    def __init__(self, n_freq: int, sample_rate: int, n_mels: int = 128, f_min: float = 0.0,
                 f_max: float | None = None, htk: bool = False,
                 norm: str | None = "slaney") -> None:
        super().__init__()
        self.n_freq, self.n_mels = int(n_freq), int(n_mels)
        fb = mel_filters(sample_rate, 2 * (self.n_freq - 1), n_mels, f_min, f_max, htk, norm,
                         dtype=torch.float64)
        register_constant(self, "filters", fb)

    def extra_repr(self) -> str:
        return f"n_freq={self.n_freq}, n_mels={self.n_mels}"

    def _input_spec(self) -> tuple[int | None, int | None]:
        return 2, self.n_freq

    def _map(self, x: Tensor) -> Tensor:
        return F.linear(x, constant_as(self, "filters", x))

    def _map_clip(self, x: Any) -> Any:
        if x.dim() != 3 or x.shape[1] != self.n_freq:
            raise ValueError(f"MelScale expects a spectrogram (B, {self.n_freq}, T), "
                             f"got shape {tuple(x.shape)}")
        return self._map(x.transpose(1, 2)).transpose(1, 2)
