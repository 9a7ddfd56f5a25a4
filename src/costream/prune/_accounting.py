"""Accounting: what a derived task must store, and the multiply-accumulates it executes.

Storage (:func:`task_storage`) counts exactly the tensors of the task's artifact
(:func:`costream.prune.adapters.save_artifact`):

* ``learned``: floating-point values learned for the task: adapter weights (after pruning),
  trained parameters outside adapters (biases, a new head; every parameter for a model trained
  in full, as fine-pruning does), SPLoPA's kept block scalings and its shared prototype bank once;
* ``buffers``: floating-point buffers that training changed with them (batch-norm statistics of
  trained modules);
* ``mask_bits``: masks, counted at one bit per entry: one bit per base channel for each pruned
  layer dimension (``"out"``/``"in"``; layers coupled inside a group each carry their own mask,
  so the count is what a self-describing artifact stores, not the information-theoretic
  minimum), and one bit per block of a SPLoPA block mask.

MACs follow the papers' convention (REFERENCE: ptflops-style multiply-accumulates), restricted to
convolutions and matrix products: :func:`count_macs` measures them with
``torch.utils.flop_counter.FlopCounterMode`` (FLOPs / 2); :func:`layer_macs` derives them from
layer shapes (output elements x fan-in); :func:`step_macs` gives the per-frame cost of a
continual network, which is what one ``forward_step`` executes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..core import CoModule


@dataclass(frozen=True)
class TaskStorage:
    """Values a task stores on top of its base network (see the module docstring).

    Example:
        >>> from costream.prune import TaskStorage
        >>> TaskStorage(learned=100, buffers=8, mask_bits=64).bytes()
        440
    """

    learned: int
    buffers: int
    mask_bits: int

    def bytes(self, value_bytes: int = 4) -> int:
        """Storage in bytes with ``value_bytes`` per value and masks packed 8 bits per byte.

        Example:
            >>> TaskStorage(learned=10, buffers=2, mask_bits=9).bytes()
            50
        """
        return (self.learned + self.buffers) * value_bytes + math.ceil(self.mask_bits / 8)


def task_storage(model: nn.Module) -> TaskStorage:
    """Count what the artifact of the derived ``model`` stores.

    Example:
        >>> import torch
        >>> from costream.prune.adapters import SPLoRAConfig, add_adapters
        >>> net = add_adapters(torch.nn.Sequential(torch.nn.Linear(6, 4)), SPLoRAConfig(rank=2))
        >>> task_storage(net)  # rank * (6 + 4) adapter weights + 4 biases
        TaskStorage(learned=24, buffers=0, mask_bits=0)
    """
    from .adapters._artifact import artifact_tensors

    learned = buffers = bits = 0
    for key, t in artifact_tensors(model).items():
        if t.dtype == torch.bool:
            bits += t.numel()
        elif key.startswith("buffer/"):
            buffers += t.numel()
        else:
            learned += t.numel()
    return TaskStorage(learned, buffers, bits)


def count_macs(model: nn.Module, *inputs: Any) -> int:
    """MACs of ``model(*inputs)`` measured by ``FlopCounterMode`` (convolutions and matmuls).

    Example:
        >>> import torch
        >>> count_macs(torch.nn.Linear(3, 5), torch.randn(2, 3))
        30
    """
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(*inputs)
    return counter.get_total_flops() // 2


def _fan_in(module: nn.Module) -> int | None:
    if isinstance(module, nn.modules.conv._ConvNd):
        return module.in_channels // module.groups * math.prod(module.kernel_size)
    if isinstance(module, nn.Linear):
        return module.in_features
    return None


def layer_macs(model: nn.Module, *inputs: Any, per_frame: bool = False) -> int:
    """MACs of every convolution and linear layer from its shapes: output elements x fan-in.

    With ``per_frame`` a continual layer's count is divided by its output length (dim 2): the
    cost of one step of a continual network, in which every layer computes the contributions of
    one new frame.

    Example:
        >>> import torch
        >>> layer_macs(torch.nn.Conv1d(2, 4, 3), torch.randn(1, 2, 10))  # 4 x 8 outputs x 6
        192
    """
    total = 0

    def hook(module: nn.Module, args: Any, out: Any) -> None:
        nonlocal total
        y = out[0] if isinstance(out, tuple) else out
        n = y.numel() // y.shape[0]
        if per_frame and isinstance(module, CoModule) and y.dim() >= 3:
            n //= y.shape[2]
        total += n * _fan_in(module)

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if _fan_in(m) is not None]
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        for h in handles:
            h.remove()
    return total


def step_macs(model: CoModule, clip: torch.Tensor) -> int:
    """MACs of one ``forward_step`` of a continual network (batch 1), from layer shapes.

    ``clip`` ``(1, C, T, *S)`` only serves to find the layers' output shapes.

    Example:
        >>> import torch, costream as cs
        >>> step_macs(cs.Conv1d(2, 4, 3), torch.randn(1, 2, 8))  # 4 outputs x 2 x 3 taps
        24
    """
    return layer_macs(model, clip[:1], per_frame=True)
