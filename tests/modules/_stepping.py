"""Test helper: a continual module stepped frame by frame over a clip."""

from __future__ import annotations

import torch
from torch import Tensor

import costream as cs


def stepped(module: cs.CoModule, x: Tensor) -> Tensor:
    """``forward_step`` on every frame of ``x`` ``(B, C, T)`` from a fresh state: the outputs
    stacked on dim 2 (``None`` exactly during the ``delay`` warm-up steps)."""
    module.reset_state()
    with torch.no_grad():
        outs = [module.forward_step(x[:, :, t]) for t in range(x.shape[2])]
    module.reset_state()
    assert all(y is None for y in outs[:module.delay])
    return torch.stack(outs[module.delay:], 2)
