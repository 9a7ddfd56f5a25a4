"""Running a network so that autograd sees every layer.

Torch-Pruning builds its dependency graph from forward hooks (continual containers call their
children through ``nn.Module.__call__``, so hooks fire) and from the autograd graph of one forward
pass, in which frozen parameters (adapter training freezes the base) leave no node.
:func:`traceable` makes every parameter require grad for the duration of a trace.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


@contextlib.contextmanager
def traceable(model: nn.Module) -> Iterator[None]:
    """Hooks visible, every parameter requiring grad, grad mode on; all restored afterwards.

    The modules' train/eval flags are restored too (Torch-Pruning's tracer calls ``eval()``).
    """
    flags = [(p, p.requires_grad) for p in model.parameters()]
    modes = [(m, m.training) for m in model.modules()]
    try:
        for p, _ in flags:
            p.requires_grad_(True)
        with torch.enable_grad():
            yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        for m, mode in modes:
            m.training = mode
