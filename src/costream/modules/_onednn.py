"""oneDNN's linear and packed convolution kernels for float32 inference on the CPU.

On CPUs where the BLAS GEMM is slow for few rows (or takes no advantage of AVX-512), oneDNN's
inner product runs a batch of frames through a layer markedly faster; a single row through a
small layer it runs slower (a fixed cost of about 10 µs per call). :func:`prefers_onednn` holds
the measured crossover, :func:`onednn_linear` the call.

A per-frame 2D convolution handed a plain kernel makes oneDNN re-lay the kernel out into its
blocked format at every call; :class:`PackedConvKernels` keeps the blocked kernel and
:func:`onednn_conv` convolves with it. Compiled and exported graphs, autograd, other dtypes
and devices never take these paths.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.flop_counter import conv_flop_count, register_flop_formula

_mkldnn_ops = getattr(torch.ops, "mkldnn", None)
ONEDNN_LINEAR = (getattr(_mkldnn_ops, "_linear_pointwise", None)
                 if torch.backends.mkldnn.is_available() else None)

ONEDNN_CONV = (getattr(_mkldnn_ops, "_convolution_pointwise", None)
               if torch.backends.mkldnn.is_available() else None)
_REORDER_CONV2D = getattr(torch._C._nn, "mkldnn_reorder_conv2d_weight", None)
_REORDER_CONV3D = getattr(torch._C._nn, "mkldnn_reorder_conv3d_weight", None)
if _REORDER_CONV2D is None or _REORDER_CONV3D is None:
    ONEDNN_CONV = None
#: oneDNN's convolution with an addend (the sum written by the convolution)
ONEDNN_CONV_ADD = None if ONEDNN_CONV is None else getattr(ONEDNN_CONV, "binary", None)

if ONEDNN_LINEAR is not None:

    @register_flop_formula(ONEDNN_LINEAR)
    def _onednn_linear_flop(x_shape, w_shape, *args, **kwargs) -> int:
        """FLOPs of oneDNN's linear (counted like ``mm``), so MAC counts include it."""
        rows = 1
        for d in x_shape[:-1]:
            rows *= d
        return 2 * rows * w_shape[0] * w_shape[1]

_ONEDNN_CONVS = [op for op in (getattr(torch.ops.aten, "mkldnn_convolution", None), ONEDNN_CONV)
                 if op is not None]
if _ONEDNN_CONVS and torch.backends.mkldnn.is_available():

    @register_flop_formula(_ONEDNN_CONVS)
    def _onednn_conv_flop(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
        """FLOPs of the oneDNN convolutions a per-frame step calls, with a plain or a packed
        kernel, and with an addend (:func:`onednn_conv_add`, whose second argument is the addend
        and third the kernel): counted like any conv."""
        if args and isinstance(args[0], (tuple, list)) and len(args[0]) >= 3:
            w_shape = args[0]  # the binary overload: (x, other, weight, ...)
        return conv_flop_count(x_shape, w_shape, out_shape, transposed=False)


def onednn_inference(x: Tensor) -> bool:
    """Whether ``x`` may go through a direct oneDNN call: float32 CPU inference, not traced, not
    under CPU autocast (which ``F.linear`` and ``F.conv2d`` obey and a direct call would
    bypass)."""
    return (x.dtype == torch.float32 and x.device.type == "cpu"
            and not torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu")
            and not torch.compiler.is_compiling() and not torch.compiler.is_exporting())


def onednn_usable(x: Tensor) -> bool:
    """Whether ``x`` may go through oneDNN's linear (:func:`onednn_inference`, and the op
    exists in this torch)."""
    return ONEDNN_LINEAR is not None and onednn_inference(x)


def prefers_onednn(rows: int, in_features: int, out_features: int) -> bool:
    """Whether oneDNN beats the BLAS GEMM for ``rows`` rows through an ``in x out`` layer.

    Measured with torch 2.13 (MKL BLAS) on an AVX-512 AMD EPYC, 1 and 2 threads, on the steps of
    seven Transformer encoders (d 256-768, 4-36 MiB of weights) and on single layers with the
    weights in the L3 cache and in DRAM:

    * products of 2^22 multiply-accumulates or more (e.g. 64 rows x 256 x 768, 6400 rows x
      24 x 54): oneDNN, 1.2-2x;
    * fewer rows with 2 or more threads through layers of 2^19 weights or more (e.g. 512 x
      1024): oneDNN, 1.1-2x layer by layer (it splits a matrix-vector product over the
      threads, the BLAS does not); on whole steps 0.9-1.1x (12 % faster on the runtime
      benchmark's 2-layer encoder, 12 % slower on a 1-layer d=512 one);
    * fewer rows on one thread: the BLAS, by 1.1-1.4x while the network's weights stay in the
      cache (it loses by about 6 % on a 36 MiB encoder);
    * oneDNN costs about 10 µs per call, and more when it has to reorder weights not in cache.
    """
    weights = in_features * out_features
    if rows * weights >= 1 << 22:
        return True
    # the thread count is read only where it decides, and never while a graph is traced
    # (dynamo cannot put the int it returns into a graph; traced graphs use F.linear anyway)
    return (weights >= 1 << 19 and not torch.compiler.is_compiling()
            and torch.get_num_threads() > 1)


#: Activations oneDNN's linear runs inside the product (post-ops, by oneDNN's name), with the
#: in-place function the other paths apply to the product's output.
POST_OPS: dict[str, Callable[[Tensor], Tensor]] = {
    "relu": torch.relu_,
    "swish": lambda y: F.silu(y, inplace=True),
    "hardswish": lambda y: F.hardswish(y, inplace=True),
    "sigmoid": torch.sigmoid_,
    "tanh": torch.tanh_,
}


def onednn_linear(x: Tensor, weight: Tensor, bias: Tensor | None,
                  attr: str = "none") -> Tensor:
    """``x @ weight.T + bias`` through oneDNN, then the post-op ``attr`` (a key of
    :data:`POST_OPS`); ``x`` ``(R, K)``, ``weight`` ``(N, K)``."""
    return ONEDNN_LINEAR(x.contiguous(), weight, bias, attr, [], "")


def linear(x: Tensor, weight: Tensor, bias: Tensor | None, attr: str = "none") -> Tensor:
    """``F.linear(x, weight, bias)`` then the activation ``attr`` (a key of :data:`POST_OPS`),
    through oneDNN (the activation inside its product) where :func:`prefers_onednn` says so."""
    k = x.shape[-1]
    rows = x.numel() // k if k else 0
    if prefers_onednn(rows, k, weight.shape[0]) and onednn_usable(x):
        y = onednn_linear(x.reshape(rows, k), weight.contiguous(), bias, attr)
        return y.view(*x.shape[:-1], weight.shape[0])
    y = F.linear(x, weight, bias)
    if attr != "none":
        POST_OPS[attr](y)  # in place: the product's own output, nothing else holds it
    return y


class PackedConvKernels:
    """2D and 3D convolution kernels in oneDNN's blocked layout, packed once per kernel.

    Handed a plain kernel, oneDNN re-lays it out at every call: for the per-frame convolutions
    of a continual 3D CNN (a few hundred kB of kernel against a small frame) that costs 10-25 %
    of the call (measured with torch 2.13 on an AVX-512 EPYC, 1 and 2 threads). A kernel is
    packed for the first input shape it meets; the layout oneDNN picks did not depend on it
    (kernels packed for batch 1 or 10 and for other frame sizes ran every input shape equally
    fast), and an input whose convolution wants another layout is still computed correctly.
    One entry per ``slot`` (the caller's name for a kernel, e.g. the cache deriving it): a
    kernel derived again after a weight change is a new tensor and replaces its slot's packed
    kernel. Copies and pickles of a module start empty, since packed tensors have no storage
    to copy.
    """

    __slots__ = ("packs",)
    _LIMIT = 8  # kernels per layer: one, or one per phase of a temporally strided conv

    def __init__(self) -> None:
        self.packs: dict[object, tuple[Tensor, int, Tensor]] = {}

    def get(self, slot: object, weight: Tensor, shape: torch.Size, padding, stride, dilation,
            groups: int) -> Tensor:
        hit = self.packs.get(slot)
        # the same tensor, unchanged (a derived kernel may be the weight itself, changed in
        # place since it was packed; kernels derived under inference mode are fresh tensors
        # each time, and have no version counter)
        version = 0 if weight.is_inference() else weight._version
        if hit is not None and hit[0] is weight and hit[1] == version:
            return hit[2]
        if hit is None and len(self.packs) >= self._LIMIT:
            self.packs.clear()
        reorder = _REORDER_CONV3D if weight.dim() == 5 else _REORDER_CONV2D
        packed = reorder(weight.to_mkldnn(), list(padding), list(stride), list(dilation), groups,
                         list(shape))
        self.packs[slot] = (weight, version, packed)
        return packed

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.packs = {}


def onednn_conv(x: Tensor, weight: Tensor, bias: Tensor | None, padding, stride, dilation,
                  groups: int, packs: PackedConvKernels | None, slot: object = None,
                  attr: str = "none") -> Tensor:
    """A float32 CPU 2D (or, for 5D ``x``, 3D) convolution through oneDNN, with ``weight``
    packed by ``packs`` (in ``slot``) if given, then the post-op ``attr`` (a key of
    :data:`POST_OPS`)."""
    if ONEDNN_CONV is None:
        y = torch.mkldnn_convolution(x, weight, bias, padding, stride, dilation, groups)
        if attr != "none":
            POST_OPS[attr](y)
        return y
    # handed the plain kernel, oneDNN re-lays it out at each call, and for grouped convs it
    # computed other bits than with the packed kernel: the steps pack every kernel they use
    if packs is not None:
        weight = packs.get(slot, weight, x.shape, padding, stride, dilation, groups)
    return ONEDNN_CONV(x, weight, bias, list(padding), list(stride), list(dilation), groups,
                       attr, [], "")


def onednn_conv_add(x: Tensor, other: Tensor, weight: Tensor, bias: Tensor | None, padding,
                    stride, dilation, groups: int, packs: PackedConvKernels | None,
                    slot: object = None, attr: str = "none") -> Tensor:
    """:func:`onednn_conv` of a 4D ``x`` plus ``other`` (the output's shape), the sum written
    by the convolution itself, then the post-op ``attr``: one pass where a conv and an addition
    made two. oneDNN fuses only ReLU after the sum (torch 2.13); other activations run in place
    on the output."""
    fused = attr == "relu"
    if ONEDNN_CONV_ADD is None:
        y = torch.mkldnn_convolution(x, weight, bias, padding, stride, dilation, groups)
        y += other
        fused = False
    else:
        if packs is not None:
            weight = packs.get(slot, weight, x.shape, padding, stride, dilation, groups)
        y = ONEDNN_CONV_ADD(x, other, weight, bias, list(padding), list(stride),
                            list(dilation), groups, "add", None, attr if fused else None, [],
                            None)
    if attr != "none" and not fused:
        POST_OPS[attr](y)  # in place: the convolution's own output
    return y
