"""Pure time shifts: :class:`Delay` (hold frames back) and :class:`Skip` (drop the first frames)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..core._module import Age, CoModule, advance, crop_warm_up
from ..core._temporal import Temporal


class Delay(CoModule):
    """Delay a stream by ``n`` steps; offline (``forward``) it is the identity.

    The state is a tuple of the last ``n`` frames, so a step moves references, not memory.

    Example:
        >>> import torch, costream as cs
        >>> d = cs.Delay(2)
        >>> [d.forward_step(torch.full((1, 1), float(t))) for t in range(3)]
        [None, None, tensor([[0.]])]
    """

    def __init__(self, n: int) -> None:
        super().__init__()
        if int(n) < 0:
            raise ValueError(f"delay must be >= 0, got {n}")
        self.n = int(n)

    def extra_repr(self) -> str:
        return f"n={self.n}"

    def _temporal(self) -> Temporal:
        return Temporal(self.n + 1, 1, 0, self.n)

    def _init(self, batch: int, shape: Any, device: torch.device, dtype: torch.dtype):
        return tuple(torch.zeros(batch, *shape, device=device, dtype=dtype)
                     for _ in range(self.n)), shape

    def _step(self, x: Tensor, state: tuple, age: Age, phase: int):
        if not state:
            return x, state, age, phase
        y, new = state[0], (*state[1:], x)
        out_age, out_phase = advance(age, phase, self.n, 1)
        if isinstance(out_age, int) and out_age < 0:
            return None, new, None, 0
        return y, new, out_age, out_phase

    def _steps(self, x: Tensor, state: tuple, age: Age, phase: int):
        if not state:
            return x, state, age, phase
        if isinstance(age, Tensor):
            return super()._steps(x, state, age, phase)
        t = x.shape[2]
        seq = torch.cat((torch.stack(state, 2), x), 2)
        new = tuple(seq[:, :, t + i] for i in range(self.n))
        y = seq[:, :, :t]
        out_age, out_phase = advance(age, phase, self.n, 1)
        y, out_age, out_phase = crop_warm_up(y, out_age, out_phase)
        return y, new, out_age, out_phase

    def _flush(self, state: tuple, age: Age, phase: int):
        if not state:
            return None, state, None, 0
        ref = state[0]
        pad = ref.new_zeros(ref.shape[0], ref.shape[1], self.n, *ref.shape[2:])
        return self._steps(pad, state, age, phase)

    def _clip(self, x: Tensor) -> Tensor:
        return x


class Skip(CoModule):
    """Drop the first ``n`` frames of a stream (offline: ``x[:, :, n:]``).

    Example:
        >>> import torch, costream as cs
        >>> cs.Skip(2)(torch.arange(5.0).view(1, 1, 5))
        tensor([[[2., 3., 4.]]])
    """

    def __init__(self, n: int) -> None:
        super().__init__()
        if int(n) < 0:
            raise ValueError(f"skip must be >= 0, got {n}")
        self.n = int(n)

    def extra_repr(self) -> str:
        return f"n={self.n}"

    def _temporal(self) -> Temporal:
        return Temporal(1, 1, -self.n, 0)

    def _step(self, x: Tensor, state: Any, age: Age, phase: int):
        out_age, out_phase = advance(age, phase, self.n, 1)
        if isinstance(out_age, int) and out_age < 0:
            return None, state, None, 0
        return x, state, out_age, out_phase

    def _steps(self, x: Tensor, state: Any, age: Age, phase: int):
        out_age, out_phase = advance(age, phase, self.n, 1)
        x, out_age, out_phase = crop_warm_up(x, out_age, out_phase)
        return x, state, out_age, out_phase

    def _clip(self, x: Tensor) -> Tensor:
        return x[:, :, self.n:]
