"""Continual short-time Fourier transform: one hop of raw samples in, one spectrum frame out.

A step takes ``hop_length`` new samples, a frame ``(B, hop_length)``; a clip is the waveform cut
into hops, ``(B, hop_length, T)`` (see :func:`hops`). The state is a ring of the last samples the
next frame still needs (``n_fft - hop_length`` of them, rounded up to whole hops; with ``center``
``n_fft // 2 + delay * hop_length``), so a step costs one windowed FFT of ``n_fft`` samples, the
same as one frame of :func:`torch.stft`.

``center=True`` (reflect padding of ``n_fft // 2`` samples at both ends, as ``torch.stft`` and
librosa do) is emulated: a frame that reaches before the stream start reads the mirrored samples
from the ring through a small index table. The first frame's mirror image includes sample
``n_fft // 2``, one past that frame's own last sample, so when ``hop_length`` divides
``n_fft // 2`` every frame is emitted one hop later than its window alone would allow (one hop of
latency; none otherwise). The end reflection is applied when a finite stream is flushed.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..core._module import Age, CoModule, advance, crop_warm_up
from ..core._temporal import Temporal
from ._exact import constant_as, register_constant

_WINDOWS = {"hann": torch.hann_window, "hamming": torch.hamming_window,
            "blackman": torch.blackman_window, "rectangular": torch.ones}


def hops(waveform: Tensor, hop_length: int) -> Tensor:
    """Cut a waveform ``(B, samples)`` into a clip of hops ``(B, hop_length, T)``.

    ``samples`` must be a multiple of ``hop_length``; hop ``t`` is ``clip[:, :, t]``.

    Example:
        >>> import torch
        >>> from costream.audio import hops
        >>> hops(torch.arange(6.0).view(1, 6), 3)[0]
        tensor([[0., 3.],
                [1., 4.],
                [2., 5.]])
    """
    if waveform.dim() != 2:
        raise ValueError(f"hops expects a waveform (B, samples), got shape {tuple(waveform.shape)}")
    b, n = waveform.shape
    if n % hop_length:
        raise ValueError(f"{n} samples are not a whole number of hops of {hop_length}; "
                         f"trim or pad the waveform first")
    return waveform.reshape(b, n // hop_length, hop_length).transpose(1, 2)


def waveform_of(clip: Tensor) -> Tensor:
    """The waveform ``(B, samples)`` of a clip of hops ``(B, hop, T)`` (inverse of :func:`hops`).

    Example:
        >>> import torch
        >>> from costream.audio import hops, waveform_of
        >>> wave = torch.arange(6.0).view(1, 6)
        >>> torch.equal(waveform_of(hops(wave, 3)), wave)
        True
    """
    return clip.transpose(1, 2).reshape(clip.shape[0], -1)


class STFT(CoModule):
    """Continual magnitude (or power) spectrogram, equal to ``torch.stft(...).abs() ** power``.

    Args:
        n_fft: FFT size; the output has ``n_fft // 2 + 1`` frequency bins.
        hop_length: samples per step.
        win_length: window length (default ``n_fft``), centred in ``n_fft`` as torch does.
        window: ``"hann"`` (periodic, torch's and librosa's default), ``"hamming"``,
            ``"blackman"``, ``"rectangular"`` or a tensor of ``win_length`` values.
        center: reflect-pad ``n_fft // 2`` samples at both ends (``pad_mode="reflect"``).
        power: 1 for the magnitude, 2 for the power spectrum.

    Shape:
        step: ``(B, hop_length)`` samples in, ``(B, n_fft // 2 + 1)`` out.
        clip: ``(B, hop_length, T)`` hops (:func:`hops`) or a waveform ``(B, samples)`` in,
        ``(B, n_fft // 2 + 1, T_out)`` out.

    Example:
        >>> import torch
        >>> from costream.audio import STFT, hops
        >>> stft = STFT(n_fft=8, hop_length=4, center=False)
        >>> wave = torch.randn(1, 32)
        >>> steps = stft.forward_steps(hops(wave, 4))      # 4 samples per step
        >>> ref = torch.stft(wave, 8, 4, window=torch.hann_window(8), center=False,
        ...                  return_complex=True).abs()
        >>> steps.shape, torch.allclose(steps, ref, atol=1e-6)
        (torch.Size([1, 5, 7]), True)
    """

    def __init__(self, n_fft: int, hop_length: int, win_length: int | None = None,
                 window: str | Tensor = "hann", center: bool = True,
                 power: float = 1.0) -> None:
        super().__init__()
        self.n_fft, self.hop_length = int(n_fft), int(hop_length)
        self.win_length = int(win_length) if win_length is not None else self.n_fft
        if not 0 < self.hop_length <= self.n_fft:
            raise ValueError(f"hop_length must be in [1, n_fft={n_fft}], got {hop_length}")
        if not 0 < self.win_length <= self.n_fft:
            raise ValueError(f"win_length must be in [1, n_fft={n_fft}], got {win_length}")
        if power not in (1, 2):
            raise ValueError(f"power must be 1 (magnitude) or 2 (power), got {power}")
        self.center, self.power = bool(center), float(power)
        if isinstance(window, str):
            if window not in _WINDOWS:
                raise ValueError(f"unknown window {window!r}; use one of {sorted(_WINDOWS)} "
                                 f"or a tensor")
            win = _WINDOWS[window](self.win_length, dtype=torch.float64)
        else:
            win = torch.as_tensor(window).detach().to(torch.float64)
            if win.shape != (self.win_length,):
                raise ValueError(f"window must have shape ({self.win_length},), "
                                 f"got {tuple(win.shape)}")
        left = (self.n_fft - self.win_length) // 2
        full = torch.zeros(self.n_fft, dtype=win.dtype)
        full[left:left + self.win_length] = win
        register_constant(self, "window", full)
        n, hop = self.n_fft, self.hop_length
        h = n // 2 if self.center else 0
        self._h = h
        # frame j is emitted at step j + lag: its window and (center) the mirror sample h are in
        self._lag = max(n - h - 1, h if self.center else 0) // hop
        # the end reflection reads the last h + 1 samples: keep one more when the window is shorter
        self._skip = 1 if self.center and self._lag == 0 else 0
        self._ring = self._lag * hop + h + self._skip  # samples kept between steps
        self._reflecting = -(-h // hop) if self.center else 0  # frames reaching before sample 0
        rows = []
        for j in range(self._reflecting + 1):
            t = torch.arange(n)
            edge = h - j * hop
            row = torch.where(t < edge, 2 * edge - t, t) if j < self._reflecting else t
            rows.append(row + self._skip)
        self.register_buffer("_reflect_index", torch.stack(rows), persistent=False)

    def extra_repr(self) -> str:
        return (f"n_fft={self.n_fft}, hop_length={self.hop_length}, win_length={self.win_length}, "
                f"center={self.center}, power={self.power:g}")

    @property
    def n_freq(self) -> int:
        """Number of frequency bins, ``n_fft // 2 + 1``."""
        return self.n_fft // 2 + 1

    # ------------------------------------------------------------------ geometry
    def _temporal(self) -> Temporal:
        pad = -(-self._h // self.hop_length)
        rf = self._lag + 1 + pad
        extent = (2 * self._h - self.n_fft) // self.hop_length + 1
        return Temporal(rf, 1, pad, self._lag + extent if self.center else 0)

    def _input_spec(self) -> tuple[int | None, int | None]:
        return 2, self.hop_length

    # ------------------------------------------------------------------ computation
    def _spectrum(self, frames: Tensor) -> Tensor:
        """``|rfft(frames * window)| ** power`` over the last dim."""
        y = torch.fft.rfft(frames * self._window_as(frames)).abs()
        return y.pow(2) if self.power == 2 else y

    def _window_as(self, x: Tensor) -> Tensor:
        return constant_as(self, "window", x)

    def _init(self, batch: int, shape: Any, device: torch.device, dtype: torch.dtype):
        if tuple(shape) != (self.hop_length,):
            raise ValueError(f"STFT steps take frames of {self.hop_length} samples (B, hop), "
                             f"got frame shape {tuple(shape)}")
        state = {"ring": torch.zeros(batch, self._ring, device=device, dtype=dtype)}
        if self._reflecting:
            state["count"] = torch.zeros(batch, dtype=torch.long, device=device)
        return state, (self.n_freq,)

    def _windows(self, seq: Tensor, state: dict, steps: int) -> Tensor:
        """The ``n_fft`` samples of the frames due at the next ``steps`` steps over ``seq``."""
        span = self._ring + self.hop_length
        win = seq.unfold(1, span, self.hop_length)[:, :steps]  # (B, steps, span)
        if not self._reflecting:
            return win[..., :self.n_fft]
        j = state["count"][:, None] + torch.arange(steps, device=seq.device) - self._lag
        idx = self._reflect_index[j.clamp(0, self._reflecting)]
        return win.gather(2, idx)

    def _step(self, x: Tensor, state: dict, age: Age, phase: int):
        seq = torch.cat((state["ring"], x), 1)
        if self._reflecting:
            j = (state["count"] - self._lag).clamp(0, self._reflecting)
            frame = seq.gather(1, self._reflect_index[j])
            new = {"ring": seq[:, self.hop_length:], "count": state["count"] + 1}
        else:
            frame = seq[:, :self.n_fft]
            new = {"ring": seq[:, self.hop_length:]}
        out_age, out_phase = advance(age, phase, self._lag, 1)
        if isinstance(out_age, int) and out_age < 0:
            return None, new, None, 0
        return self._spectrum(frame), new, out_age, out_phase

    def _steps(self, x: Tensor, state: dict, age: Age, phase: int):
        if isinstance(age, Tensor):
            return super()._steps(x, state, age, phase)
        t = x.shape[2]
        seq = torch.cat((state["ring"], waveform_of(x)), 1)
        y = self._spectrum(self._windows(seq, state, t)).transpose(1, 2)
        new = {"ring": seq[:, seq.shape[1] - self._ring:]}
        if self._reflecting:
            new["count"] = state["count"] + t
        out_age, out_phase = advance(age, phase, self._lag, 1)
        y, out_age, out_phase = crop_warm_up(y, out_age, out_phase)
        return y, new, out_age, out_phase

    def _flush(self, state: dict, age: Age, phase: int):
        if not self.center:
            return None, state, None, 0
        count = state["count"]
        if count.numel() and bool((count != count[0]).any()):
            raise ValueError("flushing a centred STFT needs every stream at the same age")
        seen = int(count[0]) * self.hop_length if count.numel() else 0
        if seen <= self._h:
            raise ValueError(f"a centred STFT needs more than n_fft // 2 = {self._h} samples "
                             f"for its reflect padding, the stream has {seen}")
        ring = state["ring"]
        if seen >= self._ring:  # the ring starts with the first frame still due
            pad = ring.flip(1)[:, 1:self._h + 1]
            padded = torch.cat((ring[:, self._skip:], pad), 1)
            first = 0
        else:  # short stream: all of it is in the ring, reflected at both ends
            tail = ring[:, ring.shape[1] - seen:]
            pad = tail.flip(1)[:, 1:self._h + 1]
            padded = torch.cat((tail[:, 1:self._h + 1].flip(1), tail, pad), 1)
            first = max(0, seen // self.hop_length - self._lag)  # frames already emitted
        frames = padded.unfold(1, self.n_fft, self.hop_length)[:, first:]
        y = self._spectrum(frames).transpose(1, 2)
        out_age, out_phase = advance(age, phase, self._lag, 1)
        if isinstance(out_age, int) and out_age < 0:
            out_age = out_phase = 0
        if y.shape[2] == 0:
            return None, state, None, 0
        return y, state, out_age, out_phase

    def _clip(self, x: Tensor) -> Tensor:
        wave = waveform_of(x) if x.dim() == 3 else x
        if wave.dim() != 2:
            raise ValueError(f"STFT expects a clip of hops (B, {self.hop_length}, T) or a "
                             f"waveform (B, samples), got shape {tuple(x.shape)}")
        if x.dim() == 3 and x.shape[1] != self.hop_length:
            raise ValueError(f"STFT expects a clip of hops (B, {self.hop_length}, T), "
                             f"got shape {tuple(x.shape)}; use costream.audio.hops(waveform)")
        spec = torch.stft(wave, self.n_fft, self.hop_length, window=self._window_as(wave),
                          center=self.center, pad_mode="reflect", return_complex=True).abs()
        return spec.pow(2) if self.power == 2 else spec

