"""Constant tensors (windows, filterbanks, DCT matrices) kept exact in float64 streams.

They are computed in float64; the module holds them as a non-persistent buffer in the default
dtype (moved and cast by ``.to()`` like any buffer), and float64 inputs use the float64 original,
so that ``module.double()`` does not compute with float32-rounded constants.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def register_constant(module: nn.Module, name: str, value: Tensor) -> None:
    """Register ``value`` (float64) as buffer ``name`` and keep its float64 original."""
    exact = getattr(module, "_exact", None)
    if exact is None:
        exact = {}
        object.__setattr__(module, "_exact", exact)
    exact[name] = value.to(torch.float64)
    module.register_buffer(name, value.to(torch.get_default_dtype()), persistent=False)


def constant_as(module: nn.Module, name: str, x: Tensor) -> Tensor:
    """Constant ``name`` in ``x``'s dtype and device (float64: the unrounded original)."""
    buf = module._buffers[name]
    if x.dtype == torch.float64:
        exact = module._exact
        if exact[name].device != x.device:
            exact[name] = exact[name].to(x.device)
        return exact[name]
    return buf if buf.dtype == x.dtype else buf.to(x.dtype)
