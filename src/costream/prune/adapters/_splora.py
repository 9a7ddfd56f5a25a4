"""SPLoRA: Structured Pruning Low-rank Adapter (Hedegaard et al., arXiv 2211.10155).

The update of a weight ``W`` (``n_out x n_in``, or a convolution kernel) is the low-rank product
``B A`` with ``A`` (``rank x n_in``) and ``B`` (``n_out x rank``); for convolutions it acts as a
``1 x ... x 1`` convolution on the kernel's centre tap. Pruning an input channel drops a column
of ``A``, an output channel a row of ``B``, so a task learns ``rank (n_in' + n_out')`` adapter
weights per layer (plus ``n_out'`` biases) for the pruned widths ``n_in'``, ``n_out'``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from ._config import SPLoRAConfig
from ._layer import AdapterLayer, Target, place_centre, register_adapter_layer, uniform_


def lora_update(a: Tensor, b: Tensor) -> Tensor:
    """The low-rank update ``B A``: ``(n_out, rank) @ (rank, n_in) -> (n_out, n_in)``.

    Example:
        >>> import torch
        >>> lora_update(torch.ones(2, 3), torch.ones(4, 2))
        tensor([[2., 2., 2.],
                [2., 2., 2.],
                [2., 2., 2.],
                [2., 2., 2.]])
    """
    return b @ a


@register_adapter_layer
class SPLoRALayer(AdapterLayer):
    """SPLoRA around a ``Linear`` or ``Conv1d/2d/3d`` (continual or not).

    Args:
        base_layer: the layer to adapt (kept, frozen by :func:`add_adapters`).
        config: a :class:`SPLoRAConfig`.

    Shape:
        as the base layer.

    Example:
        >>> import torch
        >>> conv = torch.nn.Conv2d(4, 6, 3, padding=1)
        >>> layer = SPLoRALayer(conv, SPLoRAConfig(rank=2))
        >>> tuple(layer.lora_A["weight"].shape), tuple(layer.lora_B["weight"].shape)
        ((2, 4), (6, 2))
        >>> x = torch.randn(1, 4, 5, 5)
        >>> y = layer(x)
        >>> layer.merge()
        >>> torch.allclose(layer(x), y, atol=1e-6)
        True
    """

    method = "splora"

    def _create(self, t: Target, core: tuple[int, int], weight: Tensor, config: Any,
                **shared: Any) -> None:
        if not hasattr(self, "lora_A"):
            self.lora_A = nn.ParameterDict()
            self.lora_B = nn.ParameterDict()
        n_out, n_in = core
        a = torch.empty(config.rank, n_in, dtype=weight.dtype, device=weight.device)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        b = uniform_(torch.empty(n_out, config.rank, dtype=weight.dtype, device=weight.device),
                     config)
        self.lora_A[t.key] = nn.Parameter(a)
        self.lora_B[t.key] = nn.Parameter(b)

    def delta(self, t: Target) -> Tensor:
        core = lora_update(self.lora_A[t.key], self.lora_B[t.key])
        return place_centre(core, self.base_weight(t).shape)

    def _slice(self, t: Target, side: str, keep: Tensor) -> None:
        if side == "out":
            b = self.lora_B[t.key]
            self.lora_B[t.key] = nn.Parameter(b.detach()[keep.to(b.device)].clone(),
                                              requires_grad=b.requires_grad)
        else:
            a = self.lora_A[t.key]
            self.lora_A[t.key] = nn.Parameter(a.detach()[:, keep.to(a.device)].clone(),
                                              requires_grad=a.requires_grad)


@register_adapter_layer
class SPLoRAMultiheadAttention(SPLoRALayer):
    """SPLoRA around ``torch.nn.MultiheadAttention``: the q/k/v and output projections.

    The packed ``in_proj_weight`` (``3E x E``) gets one ``B A`` pair (``B`` is ``3E x rank``),
    the output projection another (separate q/k/v projections one pair each). The embedding
    dimension is not channel-pruned: the pruner leaves groups touching attention alone.

    Example:
        >>> import torch
        >>> mha = torch.nn.MultiheadAttention(8, 2, batch_first=True)
        >>> layer = SPLoRAMultiheadAttention(mha, SPLoRAConfig(rank=2))
        >>> x = torch.randn(1, 5, 8)
        >>> layer(x, x, x)[0].shape
        torch.Size([1, 5, 8])
    """

    coupled = True
    channel_prunable = False


def splora_layer(base: nn.Module, config: SPLoRAConfig, **shared: Any) -> SPLoRALayer:
    """The SPLoRA layer class that fits ``base`` (attention or not), built around it."""
    cls = SPLoRAMultiheadAttention if isinstance(base, nn.MultiheadAttention) else SPLoRALayer
    return cls(base, config, **shared)
