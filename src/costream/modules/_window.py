"""Time operations that traced graphs need: :class:`Pad` (start/end padding along time) and
:class:`WindowReduce` (a reduction over the last ``n`` frames, e.g. ``x.mean(dim=2)`` streamed
over a sliding window)."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor

from ..core._module import Age, CoModule, advance
from ..core._temporal import Temporal


class Pad(CoModule):
    """Pad a stream along time with ``start`` frames before and ``end`` frames after.

    Offline it is ``F.pad`` along dim 2 with a constant ``value``. Online, output ``j`` is input
    frame ``j - start``: the padding frames sit in the initial state, so every step emits (no
    warm-up), and the flush appends ``end`` frames.

    Example:
        >>> import torch, costream as cs
        >>> from costream.modules import Pad
        >>> pad = Pad(2, 1)
        >>> x = torch.arange(1.0, 4.0).view(1, 1, 3)
        >>> pad(x)
        tensor([[[0., 0., 1., 2., 3., 0.]]])
        >>> pad.forward_steps(x, pad_end=True)
        tensor([[[0., 0., 1., 2., 3., 0.]]])
    """

    def __init__(self, start: int, end: int = 0, value: float = 0.0) -> None:
        super().__init__()
        if int(start) < 0 or int(end) < 0:
            raise ValueError(f"padding must be >= 0, got start={start}, end={end}")
        self.start, self.end, self.value = int(start), int(end), float(value)

    def extra_repr(self) -> str:
        return f"start={self.start}, end={self.end}, value={self.value}"

    def _temporal(self) -> Temporal:
        # output j reads input frames j - start ... j (the delay line), due at step j
        return Temporal(self.start + 1, 1, self.start, self.start + self.end)

    def _init(self, batch: int, shape: Any, device: torch.device, dtype: torch.dtype):
        return tuple(torch.full((batch, *shape), self.value, device=device, dtype=dtype)
                     for _ in range(self.start)), shape

    def _step(self, x: Tensor, state: tuple, age: Age, phase: int):
        if not state:
            return x, state, age, phase
        out_age, out_phase = advance(age, phase, 0, 1)
        return state[0], (*state[1:], x), out_age, out_phase

    def _steps(self, x: Tensor, state: tuple, age: Age, phase: int):
        if isinstance(age, Tensor):
            return super()._steps(x, state, age, phase)
        if not state:
            return x, state, age, phase
        t = x.shape[2]
        seq = torch.cat((torch.stack(state, 2), x), 2)
        new = tuple(seq[:, :, t + i] for i in range(self.start))
        return seq[:, :, :t], new, *advance(age, phase, 0, 1)

    def _flush(self, state: tuple, age: Age, phase: int):
        pad = self.start + self.end
        if pad == 0:
            return None, state, None, 0
        if state:
            ref = state[0]
            frames = torch.full((ref.shape[0], ref.shape[1], pad, *ref.shape[2:]), self.value,
                                dtype=ref.dtype, device=ref.device)
            return self._steps(frames, state, age, phase)
        raise RuntimeError("Pad without start padding cannot know the frame shape at flush")

    def _end_frames(self, state: tuple, n: int) -> Tensor:
        raise NotImplementedError

    def _clip(self, x: Tensor) -> Tensor:
        pads = [0, 0] * (x.dim() - 3) + [self.start, self.end]
        return torch.nn.functional.pad(x, pads, value=self.value)


def fuse_pad(conv: CoModule, start: int, end: int = 0) -> CoModule:
    """A copy of a continual conv (same parameters) that also zero-pads its input along time:
    the start padding then sits in its partial sums, with no delay line and no added latency.
    The copy shares the conv's parameters; make it again if the conv changes shape."""
    fused = copy.copy(conv)
    fused.__dict__ = dict(conv.__dict__)
    rp = list(conv._reversed_padding_repeated_twice)
    rp[-2] += start
    rp[-1] += end
    fused._reversed_padding_repeated_twice = rp
    fused._validate()
    return fused


_REDUCE = {"mean": torch.mean, "sum": torch.sum, "amax": torch.amax, "amin": torch.amin}


class WindowReduce(CoModule):
    """Reduce (``mean``, ``sum``, ``amax``, ``amin``) over the last ``window`` frames.

    Offline, a clip of ``window`` frames gives one frame, the reduction over its time axis;
    longer clips give one frame per sliding window. The step stacks the window held in the state.

    Example:
        >>> import torch
        >>> from costream.modules import WindowReduce
        >>> red = WindowReduce(3, "mean")
        >>> x = torch.arange(5.0).view(1, 1, 5)
        >>> red(x)
        tensor([[[1., 2., 3.]]])
        >>> red.forward_steps(x)
        tensor([[[1., 2., 3.]]])
    """

    def __init__(self, window: int, op: str = "mean") -> None:
        super().__init__()
        if int(window) < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        if op not in _REDUCE:
            raise ValueError(f"op must be one of {sorted(_REDUCE)}, got {op!r}")
        self.window, self.op = int(window), op

    def extra_repr(self) -> str:
        return f"window={self.window}, op={self.op!r}"

    def _temporal(self) -> Temporal:
        return Temporal(self.window, 1, 0, 0)

    def _init(self, batch: int, shape: Any, device: torch.device, dtype: torch.dtype):
        return tuple(torch.zeros(batch, *shape, device=device, dtype=dtype)
                     for _ in range(self.window - 1)), shape

    def _step(self, x: Tensor, state: tuple, age: Age, phase: int):
        win = torch.stack((*state, x), 0)
        new = (*state[1:], x) if state else state
        out_age, out_phase = advance(age, phase, self.window - 1, 1)
        if isinstance(out_age, int) and out_age < 0:
            return None, new, None, 0
        return _REDUCE[self.op](win, 0), new, out_age, out_phase

    def _clip(self, x: Tensor) -> Tensor:
        win = x.unfold(2, self.window, 1)  # (B, C, T', *S, window)
        return _REDUCE[self.op](win, -1)
