"""Squeeze-and-Excitation for video networks, pooled over the clip or over each frame.

X3D (Feichtenhofer, CVPR 2020, arXiv 2004.04730) gates the channels of its bottlenecks with an
SE block whose average pool spans the whole clip (time and space): the offline original. That
pool mixes every frame of the clip, so it cannot be computed frame by frame; Co3D (arXiv
2106.00050) pools each frame over space only, which makes the block a per-frame map that streams
exactly (the ``"frame"`` scope, used by the continual CoX3D models).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...modules._frame import _FrameMap

SEScope = Literal["clip", "frame"]


def round_width(width: int, multiplier: float, min_width: int = 8, divisor: int = 8) -> int:
    """``width * multiplier`` rounded to a multiple of ``divisor`` (at least ``min_width``),
    never rounding down by more than 10 % (the X3D rule for SE and stage widths).

    Example:
        >>> [round_width(c, 1 / 16) for c in (54, 108, 216, 432)]
        [8, 8, 16, 32]
    """
    scaled = width * multiplier
    out = max(min_width, int(scaled + divisor / 2) // divisor * divisor)
    if out < 0.9 * scaled:
        out += divisor
    return int(out)


class SqueezeExcitation(_FrameMap):
    """``x * sigmoid(fc2(relu(fc1(mean(x)))))`` with the mean over the clip or over each frame.

    ``fc1`` / ``fc2`` hold ``Conv3d`` 1x1x1 parameters (the checkpoint layout of PyTorchVideo and
    PySlowFast); they are applied as linear maps over channels.

    Args:
        channels: input (and output) channels.
        squeeze_channels: width of the bottleneck between ``fc1`` and ``fc2``.
        scope: ``"clip"`` pools each clip over time and space (offline X3D; cannot be stepped);
            ``"frame"`` pools each frame over space (streams exactly, no delay).

    Shape:
        clip ``(B, C, T, H, W)`` -> same; frame ``(B, C, H, W)`` -> same (``"frame"`` only).

    Example:
        >>> import torch
        >>> from costream.models import SqueezeExcitation
        >>> se = SqueezeExcitation(16, 8, scope="frame").double()
        >>> x = torch.randn(2, 16, 5, 4, 4, dtype=torch.double)
        >>> torch.allclose(se.forward_steps(x), se(x))
        True
    """

    def __init__(self, channels: int, squeeze_channels: int, scope: SEScope = "frame") -> None:
        super().__init__()
        if scope not in ("clip", "frame"):
            raise ValueError(f"se_scope must be 'clip' or 'frame', got {scope!r}")
        self.scope = scope
        self.fc1 = nn.Conv3d(channels, squeeze_channels, 1, bias=True)
        self.fc2 = nn.Conv3d(squeeze_channels, channels, 1, bias=True)

    def extra_repr(self) -> str:
        return f"scope={self.scope!r}"

    def _gate(self, pooled: Tensor) -> Tensor:
        """Channel gates from pooled features ``(..., C)`` (channels last)."""
        fc1, fc2 = self._modules["fc1"], self._modules["fc2"]  # direct lookup: cheap per step
        z = F.relu(F.linear(pooled, fc1.weight.flatten(1), fc1.bias))
        return torch.sigmoid(F.linear(z, fc2.weight.flatten(1), fc2.bias))

    def _map(self, x: Tensor) -> Tensor:
        if self.scope == "clip":
            raise RuntimeError(
                "SqueezeExcitation(scope='clip') pools over the whole clip, so it cannot run "
                "frame by frame; build the model with se_scope='frame' to stream it "
                "(e.g. costream.models.create_model('cox3d_s'))"
            )
        s = self._gate(x.mean(dim=tuple(range(2, x.dim()))))
        return x * s.view(*s.shape, *(1,) * (x.dim() - 2))

    def _map_clip(self, x: Tensor) -> Tensor:
        if self.scope == "clip":
            s = self._gate(x.mean(dim=tuple(range(2, x.dim()))))
            return x * s.view(*s.shape, *(1,) * (x.dim() - 2))
        s = self._gate(x.mean(dim=tuple(range(3, x.dim()))).transpose(1, 2))  # (B, T, C)
        return x * s.transpose(1, 2).reshape(*x.shape[:3], *(1,) * (x.dim() - 3))
