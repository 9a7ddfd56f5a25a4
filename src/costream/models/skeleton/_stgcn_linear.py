"""Matrix products of the ST-GCN family's per-frame layers and its temporal convolution.

A skeleton frame is tiny (persons x joints, e.g. 2 x 25 positions), so every layer of a step is
a narrow matrix product, run by :func:`costream.modules._onednn.linear` (oneDNN or the BLAS,
whichever is faster at the shape); :class:`TemporalConv` steps a ``(k, 1)`` temporal
convolution as one such product.
"""

from __future__ import annotations

from torch import Tensor

import costream as cs
from costream.modules._onednn import linear


def linear_channels(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """A 1x1 convolution as one matrix product: ``(N, C_in, *S)`` -> ``(N, C_out, *S)``.

    The result is channels-innermost in memory (a transposed view of the product).
    """
    n, c = x.shape[:2]
    rows = x.reshape(n, c, -1).transpose(1, 2).reshape(-1, c)  # (N * L, C_in)
    y = linear(rows, weight, bias).view(n, -1, weight.shape[0]).transpose(1, 2)
    return y.view(n, weight.shape[0], *x.shape[2:])


class TemporalConv(cs.Conv2d):
    """A continual temporal convolution with a ``(k, 1)`` kernel, stepped as one matrix product.

    Each step maps the frame's joints ``(M * V, C_in)`` with the kernel's ``k`` taps stacked as
    one ``(k * C_out, C_in)`` linear map (CPU convolution kernels handle this 1-wide case far
    slower than a GEMM); ``forward`` on a clip is torch's ``Conv2d``.
    Parameters are those of ``Conv2d(C_in, C_out, (k, 1))``.

    Shape:
        clip ``(N, C_in, T, S)`` -> ``(N, C_out, T_out, S)``; frame ``(N, C_in, S)``.

    Example:
        >>> import torch
        >>> from costream.models.skeleton._stgcn_linear import TemporalConv
        >>> conv = TemporalConv(4, 6, (9, 1), stride=(2, 1), padding=(4, 0)).double()
        >>> x = torch.randn(2, 4, 11, 5, dtype=torch.double)
        >>> torch.allclose(conv.forward_steps(x, pad_end=True), conv(x))
        True
    """

    def _validate(self) -> None:
        super()._validate()
        if (self.kernel_size[1], self.stride[1], self.dilation[1], self.padding[1],
                self.groups) != (1, 1, 1, 0, 1):
            raise ValueError("TemporalConv needs a (k, 1) kernel without spatial stride, "
                             "dilation or padding, and groups=1")

    def _gemm_layout(self, w_all: Tensor, b_all: Tensor | None) -> tuple[Tensor, Tensor | None]:
        # (taps * C_out, C_in, 1) -> (taps * C_out, C_in): a linear map of the frame's joints
        return w_all.reshape(w_all.shape[0], -1).contiguous(), b_all

    def _contributions(self, x: Tensor, kernel=None) -> Tensor:
        if x.dim() != 3:
            raise ValueError(f"TemporalConv steps frames (N, C, S), got {tuple(x.shape)}")
        params = self._parameters
        w, b = (kernel or self._cache).get(params["weight"], params["bias"])
        n, c, s = x.shape
        z = linear(x.transpose(1, 2).reshape(n * s, c), w, b).view(n, s, -1)
        # (N, S, taps * C_out) -> (N, groups=1, taps, C_out, S), a view
        return z.transpose(1, 2).view(n, 1, w.shape[0] // self.out_channels,
                                      self.out_channels, s)
