"""Caching of tensors derived from parameters (e.g. a re-laid-out conv kernel), and of a
step's scratch tensors."""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

_INFERENCE_SOURCES = (
    "parameters created under torch.inference_mode() (inference tensors) have no version "
    "counter, so kernels derived from them are recomputed at every step; create or copy the "
    "model outside inference mode to step at full speed"
)


def _key(sources: tuple) -> tuple:
    return tuple((s.data_ptr(), s._version) if isinstance(s, Tensor) else s for s in sources)


class DerivedCache:
    """Recompute ``fn()`` only when one of the source tensors changed (in place or replaced).

    Sources other than tensors (``None``, a float such as a batch norm's ``eps``) count as
    changed when their value differs.

    The cache is bypassed while autograd records (so gradients reach the parameters) and while
    ``torch.compile`` / ``torch.export`` trace (the derivation becomes part of the graph).
    """

    __slots__ = ("fn", "key", "sources", "value")

    def __init__(self, fn: Callable[[], tuple[Tensor | None, ...]]) -> None:
        self.fn = fn
        self.key: tuple | None = None
        self.sources: tuple = ()
        self.value: tuple[Tensor | None, ...] | None = None

    def get(self, *sources: Any) -> tuple[Tensor | None, ...]:
        if torch.compiler.is_compiling():
            return self.fn()
        if torch.is_grad_enabled() and any(isinstance(s, Tensor) and s.requires_grad
                                           for s in sources):
            return self.fn()
        # fast path (the steady state): the same tensors, unchanged since the last call
        key, old = self.key, self.sources
        if key is not None and len(sources) == len(old):
            try:
                for s, o, k in zip(sources, old, key):
                    if isinstance(s, Tensor):
                        if s is not o or s._version != k[1] or s.data_ptr() != k[0]:
                            break
                    elif s != k:
                        break
                else:
                    return self.value
            except RuntimeError:  # an inference tensor (no version counter) among the sources
                pass
        value = self.fn()
        if any(isinstance(s, Tensor) and s.is_inference() for s in sources):
            # created under torch.inference_mode: no version counter tells in-place changes
            warnings.warn(_INFERENCE_SOURCES, stacklevel=4)
            self.invalidate()
            return value
        self.value = value
        # identity too: a replaced tensor may reuse the freed address with a fresh version
        self.key = _key(sources)
        self.sources = sources
        return self.value

    def invalidate(self) -> None:
        """Forget the cached value (it is recomputed at the next :meth:`get`)."""
        self.key = self.value = None
        self.sources = ()


class Scratch:
    """Scratch tensors of a step, kept from step to step: a tensor written and read within one
    call, never part of a state or an output, need not be a fresh allocation, whose first touch
    costs page faults and cache misses on every step.

    One flat buffer per dtype, device, thread and inference mode (a tensor made under
    ``torch.inference_mode`` takes no writes outside it), grown to the largest request;
    :meth:`get` returns a view of its start. Every layer asking the same instance writes the
    same memory, which the previous layer has just touched: it stays in the caches where one
    buffer per layer would not. A tensor from :meth:`get` is valid until the next
    :meth:`get` on the same thread. Copies and pickles start empty.
    """

    __slots__ = ("buffers", "views")
    _LIMIT = 16

    def __init__(self) -> None:
        self.buffers: dict[tuple, Tensor] = {}
        self.views: dict[tuple, Tensor] = {}  # the views handed out, by request

    def get(self, shape: tuple, dtype: torch.dtype, device: torch.device,
            memory_format: torch.memory_format) -> Tensor:
        # a buffer made under torch.inference_mode takes no writes outside it
        key = (dtype, device, threading.get_ident(), torch.is_inference_mode_enabled())
        view = self.views.get((shape, memory_format, key))
        if view is not None:  # (a step asks the same shapes every time: no new view)
            return view
        n = 1
        for d in shape:
            n *= d
        flat = self.buffers.get(key)
        if flat is None and len(self.buffers) >= self._LIMIT:
            self.buffers.clear()  # threads come and go: keep the memory bounded
            self.views.clear()
        if flat is None or flat.numel() < n:
            flat = self.buffers[key] = torch.empty(n, dtype=dtype, device=device)
            self.views = {k: v for k, v in self.views.items() if k[2] != key}  # the old buffer's
        if len(self.views) >= 8 * self._LIMIT:
            self.views.clear()
        if memory_format == torch.channels_last and len(shape) == 4:
            b, c, h, w = shape
            view = flat[:n].view(b, h, w, c).permute(0, 3, 1, 2)
        elif memory_format == torch.channels_last_3d and len(shape) == 5:
            b, c, d, h, w = shape
            view = flat[:n].view(b, d, h, w, c).permute(0, 4, 1, 2, 3)
        else:
            view = flat[:n].view(shape)
        self.views[(shape, memory_format, key)] = view
        return view

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.buffers, self.views = {}, {}
