"""The engine's automatic block size, from the activations of one batched step.

A batched step over large frames (video) makes tensors that grow with the number of streams.
Once one of them passes glibc's largest dynamic ``mmap`` threshold (32 MiB on 64-bit Linux),
every step maps it afresh and pays its page faults (2x the step time measured with 64
CoX3D-XS streams). Blocks of streams whose largest activation stays under that size avoid
this, and keep each call's working set nearer the caches.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

from ..core._module import CoModule

#: Largest activation a batched call may make (glibc's largest dynamic mmap threshold).
BLOCK_BYTES = 32 * 2**20


class _Sizes(TorchDispatchMode):
    """Bytes of every tensor each ATen operation returns, in call order."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, Tensor):
                self.sizes.append(t.numel() * t.element_size())
        return out


def activation_bytes(module: CoModule, frame_shape: tuple[int, ...],
                     device: torch.device | str | None = None,
                     dtype: torch.dtype | None = None) -> int:
    """Bytes one more stream adds to the largest tensor of a steady-state step.

    Steps the module over one stride period from a fresh state (zero frames) at batch 1 and 2,
    as in steady state (every layer runs, as once the warm-up is over; a first step from a
    fresh stream would stop at the first layer still warming up), and compares the tensors
    each operation makes: weights and kernels derived from them do not grow with the batch,
    activations do. It costs one stride period of steps, not a warm-up.

    Example:
        >>> import costream as cs
        >>> from costream.runtime._blocks import activation_bytes
        >>> activation_bytes(cs.Conv1d(4, 8, 3), (4,))  # taps of 8 channels x 3, float32
        96
    """
    runs = []
    for batch in (1, 2):
        state = module.init_state(batch, tuple(frame_shape), device=device, dtype=dtype)
        x = torch.zeros(batch, *frame_shape, device=state["age"].device,
                        dtype=dtype or _float_dtype(module))
        tree = state["tree"]
        with torch.inference_mode(), _Sizes() as sizes:
            for phase in range(module.temporal.stride):
                _, tree, _, _ = module._step(x, tree, None, phase)
        runs.append(sizes.sizes)
    if len(runs[0]) != len(runs[1]):  # another sequence of operations: the whole batch-2 step
        return max(runs[1], default=0) // 2
    return max((b - a for a, b in zip(*runs)), default=0)


def auto_max_batch(module: CoModule, capacity: int, frame_shape: tuple[int, ...],
                   device: torch.device | str | None = None,
                   dtype: torch.dtype | None = None) -> int:
    """Streams per block: as many as keep the largest activation under
    :data:`BLOCK_BYTES`, spread evenly over the blocks ``capacity`` needs."""
    try:
        per_stream = activation_bytes(module, frame_shape, device, dtype)
    except (RuntimeError, TypeError, ValueError):  # frames or dtype the engine then refuses
        return capacity
    fit = capacity if per_stream == 0 else max(1, min(capacity, BLOCK_BYTES // per_stream))
    blocks = math.ceil(capacity / fit)
    return math.ceil(capacity / blocks)


def _float_dtype(module: CoModule) -> torch.dtype:
    p = next(module.parameters(), None)
    return p.dtype if p is not None else torch.get_default_dtype()
