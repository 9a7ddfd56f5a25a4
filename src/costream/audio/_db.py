"""Continual power-to-decibel conversion (stateless, per frame)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..modules._frame import _FrameMap


class ToDB(_FrameMap):
    """``10 log10(max(x, amin)) - 10 log10(max(ref, amin))``, as librosa's ``power_to_db``.

    A fixed reference keeps every frame independent of the rest of the stream: librosa's
    ``top_db`` clipping (relative to the clip's maximum) cannot stream and is not offered.

    Args:
        amin: floor of the input (avoids ``log(0)``).
        ref: reference power (0 dB).
        multiplier: 10 for power spectra, 20 for magnitudes.

    Example:
        >>> import torch
        >>> from costream.audio import ToDB
        >>> ToDB()(torch.tensor([[[1.0, 100.0, 0.0]]]))
        tensor([[[   0.,   20., -100.]]])
    """

    def __init__(self, amin: float = 1e-10, ref: float = 1.0, multiplier: float = 10.0) -> None:
        super().__init__()
        if amin <= 0:
            raise ValueError(f"amin must be > 0, got {amin}")
        self.amin, self.ref, self.multiplier = float(amin), float(ref), float(multiplier)
        self._offset = self.multiplier * math.log10(max(self.ref, self.amin))

    def extra_repr(self) -> str:
        return f"amin={self.amin:g}, ref={self.ref:g}, multiplier={self.multiplier:g}"

    def _map(self, x: Tensor) -> Tensor:
        y = self.multiplier * torch.log10(x.clamp_min(self.amin))
        return y - self._offset if self._offset else y

    def _map_clip(self, x: Tensor) -> Tensor:
        return self._map(x)
