"""oneDNN's linear for float32 inference on the CPU.

On CPUs where the BLAS GEMM is slow for few rows (or takes no advantage of AVX-512), oneDNN's
inner product runs a batch of frames through a layer markedly faster; a single row through a
small layer it runs slower (a fixed cost of about 10 µs per call). :func:`prefers_onednn` holds
the measured crossover, :func:`onednn_linear` the call. Compiled and exported graphs, autograd,
other dtypes and devices never take this path.
"""

from __future__ import annotations

import torch
from torch import Tensor

_mkldnn_ops = getattr(torch.ops, "mkldnn", None)
ONEDNN_LINEAR = (getattr(_mkldnn_ops, "_linear_pointwise", None)
                 if torch.backends.mkldnn.is_available() else None)

if ONEDNN_LINEAR is not None:
    from torch.utils.flop_counter import register_flop_formula

    @register_flop_formula(ONEDNN_LINEAR)
    def _onednn_linear_flop(x_shape, w_shape, *args, **kwargs) -> int:
        """FLOPs of oneDNN's linear (counted like ``mm``), so MAC counts include it."""
        rows = 1
        for d in x_shape[:-1]:
            rows *= d
        return 2 * rows * w_shape[0] * w_shape[1]


def onednn_usable(x: Tensor) -> bool:
    """Whether ``x`` may go through oneDNN's linear: float32 CPU inference, not traced."""
    return (ONEDNN_LINEAR is not None and x.dtype == torch.float32 and x.device.type == "cpu"
            and not torch.is_grad_enabled() and not torch.compiler.is_compiling()
            and not torch.compiler.is_exporting())


def prefers_onednn(rows: int, in_features: int, out_features: int) -> bool:
    """Whether oneDNN beats the BLAS GEMM for ``rows`` rows through an ``in x out`` layer.

    Measured with torch 2.13 (MKL BLAS) on an AVX-512 AMD EPYC, 1 and 2 threads: for a
    256 x 768 layer the BLAS wins at 1-2 rows, oneDNN from 4 rows on (1.7x at 64 rows); a
    16 x 48 layer is always faster through the BLAS.
    """
    return rows >= 4 and rows * in_features * out_features >= 1 << 19


def onednn_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``x @ weight.T + bias`` through oneDNN; ``x`` ``(R, K)``, ``weight`` ``(N, K)``."""
    return ONEDNN_LINEAR(x.contiguous(), weight, bias, "none", [], "")
