"""SPPaRA: Structured Pruning Parallel Residual Adapter (Hedegaard et al., arXiv 2211.10155).

A parallel residual adapter adds a pointwise (``1 x ... x 1``) convolution ``P``
(``n_out x n_in / groups``) next to a convolution; folded into the kernel it is an update of
the centre tap, ``W'[:, :, centre] = W[:, :, centre] + P``. Pruning drops rows and columns of
``P``, so a task learns ``n_out' n_in'`` adapter weights per layer.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ._config import SPPaRAConfig
from ._layer import AdapterLayer, Target, place_centre, register_adapter_layer, uniform_


@register_adapter_layer
class SPPaRALayer(AdapterLayer):
    """SPPaRA around a ``Conv1d/2d/3d`` (continual or not).

    Args:
        base_layer: the convolution to adapt.
        config: a :class:`SPPaRAConfig`.

    Shape:
        as the base convolution.

    Example:
        >>> import torch
        >>> conv = torch.nn.Conv1d(3, 5, 3, padding=1)
        >>> layer = SPPaRALayer(conv, SPPaRAConfig(init_scale=0.1))
        >>> tuple(layer.para_P["weight"].shape)
        (5, 3)
        >>> x = torch.randn(2, 3, 7)
        >>> y = layer(x)
        >>> layer.merge()
        >>> torch.allclose(layer(x), y, atol=1e-6)
        True
    """

    method = "sppara"

    def _create(self, t: Target, core: tuple[int, int], weight: Tensor, config: Any,
                **shared: Any) -> None:
        if not hasattr(self, "para_P"):
            self.para_P = nn.ParameterDict()
        p = torch.empty(core, dtype=weight.dtype, device=weight.device)
        self.para_P[t.key] = nn.Parameter(uniform_(p, config))

    def delta(self, t: Target) -> Tensor:
        return place_centre(self.para_P[t.key], self.base_weight(t).shape)

    def _slice(self, t: Target, side: str, keep: Tensor) -> None:
        p = self.para_P[t.key]
        idx = keep.to(p.device)
        sliced = p.detach()[idx] if side == "out" else p.detach()[:, idx]
        self.para_P[t.key] = nn.Parameter(sliced.clone(), requires_grad=p.requires_grad)


def sppara_layer(base: nn.Module, config: SPPaRAConfig, **shared: Any) -> SPPaRALayer:
    """An :class:`SPPaRALayer` around ``base``."""
    return SPPaRALayer(base, config, **shared)
