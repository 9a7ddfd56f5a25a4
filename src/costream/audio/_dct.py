"""Continual DCT-II over the channel dimension (the cepstral step of MFCCs)."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..modules._frame import _FrameMap
from ._exact import constant_as, register_constant


def dct_matrix(n_in: int, n_out: int, norm: str | None = "ortho",
               dtype: torch.dtype = torch.float32) -> Tensor:
    """The DCT-II as a matrix ``(n_out, n_in)``: ``y = D @ x`` keeps the first ``n_out`` terms.

    ``norm="ortho"`` gives the orthonormal DCT-II (scipy's ``dct(type=2, norm="ortho")``);
    ``None`` the unnormalised ``2 * sum x[n] cos(pi k (2n + 1) / (2 N))``.

    Example:
        >>> import torch
        >>> from costream.audio import dct_matrix
        >>> d = dct_matrix(8, 8, dtype=torch.float64)
        >>> torch.allclose(d @ d.T, torch.eye(8, dtype=torch.float64))
        True
    """
    if norm not in (None, "ortho"):
        raise ValueError(f"norm must be 'ortho' or None, got {norm!r}")
    if not 0 < n_out <= n_in:
        raise ValueError(f"need 0 < n_out <= n_in, got n_out={n_out}, n_in={n_in}")
    n = torch.arange(n_in, dtype=torch.float64)
    k = torch.arange(n_out, dtype=torch.float64)[:, None]
    d = 2.0 * torch.cos(math.pi * k * (2 * n + 1) / (2 * n_in))
    if norm == "ortho":
        d[0] *= math.sqrt(1.0 / (4 * n_in))
        d[1:] *= math.sqrt(1.0 / (2 * n_in))
    return d.to(dtype)


class DCT(_FrameMap):
    """Continual DCT-II of each frame over the channels (stateless).

    Args:
        n_in: input channels (e.g. mel bands).
        n_out: coefficients kept (e.g. ``n_mfcc``).
        norm: ``"ortho"`` or ``None``, as for :func:`dct_matrix`.

    Shape:
        step: ``(B, n_in)`` -> ``(B, n_out)``; clip: ``(B, n_in, T)`` -> ``(B, n_out, T)``.

    Example:
        >>> import torch
        >>> from costream.audio import DCT
        >>> DCT(40, 13)(torch.randn(1, 40, 6)).shape
        torch.Size([1, 13, 6])
    """

    def __init__(self, n_in: int, n_out: int, norm: str | None = "ortho") -> None:
        super().__init__()
        self.n_in, self.n_out = int(n_in), int(n_out)
        register_constant(self, "matrix", dct_matrix(self.n_in, self.n_out, norm, torch.float64))

    def extra_repr(self) -> str:
        return f"n_in={self.n_in}, n_out={self.n_out}"

    def _input_spec(self) -> tuple[int | None, int | None]:
        return 2, self.n_in

    def _map(self, x: Tensor) -> Tensor:
        return F.linear(x, constant_as(self, "matrix", x))

    def _map_clip(self, x: Any) -> Any:
        if x.dim() != 3 or x.shape[1] != self.n_in:
            raise ValueError(f"DCT expects a clip (B, {self.n_in}, T), got shape {tuple(x.shape)}")
        return self._map(x.transpose(1, 2)).transpose(1, 2)
