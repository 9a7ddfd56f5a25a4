"""MACs in the ptflops convention, for a clip and for one continual step.

The complexity figures of the continual-inference papers (e.g. Co3D, arXiv 2106.00050) are
ptflops counts: multiply-accumulates of convolutions and linear layers plus one operation per
element for the cheap layers. This module reproduces that convention by counting the ATen
operations a call executes (a ``TorchDispatchMode``), which works alike for an offline forward
(where ptflops would hook modules) and for a continual step (where containers call their
children's step functions directly):

==========================  =====================================================
operation                   MACs
==========================  =====================================================
convolution                 output elements x (C_in / groups) x kernel volume,
                            plus one per output element for the bias
matmul (linear)             M x N x K, plus one per output element for the bias
batch / layer / group norm  two per input element (one without affine parameters)
activation                  one per output element (ReLU family, Swish/SiLU,
                            sigmoid, tanh, GELU, softmax, ...)
pooling (also ``mean``)     one per input element
element-wise arithmetic     one per output element (``add``, ``sub``, ``mul``, ``div``
                            of floating-point tensors: residual sums, SE gating,
                            the partial-sum updates of continual convolutions)
attention                   per batch and head: ``Q K^T`` and ``A V`` (``L x S x d``
                            each), the softmax and the mask (one per score), and
                            the scaling of queries and keys; fused kernels
                            (``scaled_dot_product_attention``, the ``nn``
                            Transformer fast paths) count as their decomposition
==========================  =====================================================

The last row follows ptflops 0.7, which counts ``torch.add`` / ``torch.mul`` calls; counting
them at the ATen level also catches operator syntax (``x + y``) and in-place updates. On
``meta`` tensors nothing is computed, so whole networks at full input size are counted in
milliseconds.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from ..modules._fusion import unfused

__all__ = ["PtflopsCounter", "ptflops_macs", "ptflops_step_macs"]

aten = torch.ops.aten


def _numel(t: Any) -> int:
    return t.numel() if isinstance(t, Tensor) else 0


def _conv(args: tuple, kwargs: dict, out: Any, transposed: bool = False) -> int:
    x, w = args[0], args[1]
    bias = args[2] if len(args) > 2 else kwargs.get("bias")
    per = w.shape[1] * math.prod(w.shape[2:])
    macs = (x.numel() if transposed else out.numel()) * per
    return macs + (out.numel() if bias is not None else 0)


def _convolution(args: tuple, kwargs: dict, out: Any) -> int:
    transposed = args[6] if len(args) > 6 else kwargs.get("transposed", False)
    return _conv(args, kwargs, out, bool(transposed))


def _conv_transpose(args: tuple, kwargs: dict, out: Any) -> int:
    return _conv(args, kwargs, out, True)


def _linear(args: tuple, kwargs: dict, out: Any) -> int:
    bias = args[2] if len(args) > 2 else kwargs.get("bias")
    return out.numel() * args[1].shape[1] + (out.numel() if bias is not None else 0)


def _mm(args: tuple, kwargs: dict, out: Any) -> int:
    a = args[0]
    return out.numel() * a.shape[-1]


def _addmm(args: tuple, kwargs: dict, out: Any) -> int:
    return out.numel() * args[1].shape[-1] + out.numel()


def _norm(args: tuple, kwargs: dict, out: Any) -> int:
    weight = args[1] if len(args) > 1 else kwargs.get("weight")
    return args[0].numel() * (2 if weight is not None else 1)


def _layer_norm(args: tuple, kwargs: dict, out: Any) -> int:
    weight = args[2] if len(args) > 2 else kwargs.get("weight")
    return args[0].numel() * (2 if weight is not None else 1)


def _activation(args: tuple, kwargs: dict, out: Any) -> int:
    return _numel(out[0] if isinstance(out, (tuple, list)) else out)


def _pool(args: tuple, kwargs: dict, out: Any) -> int:
    return args[0].numel()


def _elementwise(args: tuple, kwargs: dict, out: Any) -> int:
    return out.numel() if isinstance(out, Tensor) and out.is_floating_point() else 0


def _attention_core(bh: int, length: int, source: int, dk: int, dv: int, masked: bool) -> int:
    """Scaled dot-product attention as its math decomposition counts it: scaling of queries
    and keys, ``Q K^T``, the (optional) mask sum, the softmax and ``A V``."""
    return bh * (length * dk + source * dk + length * source * (dk + 1 + dv + int(masked)))


def _sdpa(args: tuple, kwargs: dict, out: Any, mask_at: int = 3) -> int:
    q, k, v = args[:3]
    mask = args[mask_at] if len(args) > mask_at else kwargs.get("attn_mask")
    length, dk = q.shape[-2], q.shape[-1]
    bh = q.numel() // max(length * dk, 1)
    return _attention_core(bh, length, k.shape[-2], dk, v.shape[-1], mask is not None)


def _sdpa_cpu(args: tuple, kwargs: dict, out: Any) -> int:
    # (query, key, value, dropout_p, is_causal, attn_mask, scale)
    return _sdpa(args, kwargs, out, mask_at=5)


def _native_mha(args: tuple, kwargs: dict, out: Any) -> int:
    """``nn.MultiheadAttention``'s fused inference path: projections, attention, output."""
    query, key = args[0], args[1]
    e, h = int(args[3]), int(args[4])
    mask = args[9] if len(args) > 9 else kwargs.get("mask")
    b, length = query.shape[0], query.shape[1]
    source = key.shape[1]
    proj = b * length * (e * e + e) + 2 * b * source * (e * e + e)
    core = _attention_core(b * h, length, source, e // h, e // h, mask is not None)
    return proj + core + b * length * (e * e + e)


def _native_encoder_layer(args: tuple, kwargs: dict, out: Any) -> int:
    """``nn.TransformerEncoderLayer``'s fused inference path: attention, two residual sums,
    two layer norms and the feed-forward block."""
    src, e, h = args[0], int(args[1]), int(args[2])
    ffn = args[14].shape[0]  # ffn_weight_1 (F, E)
    mask = args[18] if len(args) > 18 else kwargs.get("mask")
    b, length = src.shape[0], src.shape[1]
    tokens = b * length
    attention = _native_mha((src, src, src, e, h), {"mask": mask}, None)
    feed_forward = tokens * (e * ffn + ffn) + tokens * ffn + tokens * (ffn * e + e)
    return attention + 2 * tokens * e + 2 * 2 * tokens * e + feed_forward


_RULES: dict[Any, Callable[[tuple, dict, Any], int]] = {}


def _register(packets: list[str], rule: Callable[[tuple, dict, Any], int]) -> None:
    for name in packets:
        packet = getattr(aten, name, None)
        if packet is not None:
            _RULES[packet] = rule


# Under ``torch.inference_mode`` composite operations (conv2d, linear, batch_norm, ...) reach
# the mode undecomposed; otherwise their decompositions (convolution, addmm, ...) do. Each call
# is seen at one level only, so both levels have rules.
_register(["convolution", "_convolution", "convolution_overrideable"], _convolution)
_register(["conv1d", "conv2d", "conv3d", "mkldnn_convolution"], _conv)
_register(["conv_transpose1d", "conv_transpose2d", "conv_transpose3d"], _conv_transpose)
_register(["linear"], _linear)
_register(["mm", "bmm", "matmul"], _mm)
_register(["addmm", "baddbmm"], _addmm)
_register(["_native_batch_norm_legit_no_training", "_native_batch_norm_legit",
           "native_batch_norm", "native_group_norm", "batch_norm", "instance_norm"], _norm)
_register(["native_layer_norm", "layer_norm", "group_norm"], _layer_norm)
_register(["relu", "relu_", "relu6", "leaky_relu", "leaky_relu_", "elu", "elu_", "celu",
           "selu", "prelu", "_prelu_kernel", "gelu", "gelu_", "silu", "silu_", "mish", "mish_",
           "sigmoid", "sigmoid_", "tanh", "tanh_", "hardtanh", "hardtanh_", "hardswish",
           "hardswish_", "hardsigmoid", "hardsigmoid_", "softplus", "_softmax", "softmax",
           "_log_softmax", "log_softmax", "threshold", "threshold_"], _activation)
_register(["avg_pool1d", "avg_pool2d", "avg_pool3d", "max_pool1d", "max_pool2d",
           "max_pool3d", "max_pool2d_with_indices", "max_pool3d_with_indices",
           "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d",
           "_adaptive_avg_pool2d", "_adaptive_avg_pool3d", "adaptive_max_pool1d",
           "adaptive_max_pool2d", "adaptive_max_pool3d", "mean"], _pool)
_register(["add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_"], _elementwise)
_onednn_linear = getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)


def _onednn_linear_rule(args: tuple, kwargs: dict, out: Any) -> int:
    """oneDNN's linear, plus one per output element for a fused activation (post-op)."""
    attr = args[3] if len(args) > 3 else kwargs.get("attr", "none")
    return _linear(args, kwargs, out) + (out.numel() if attr != "none" else 0)


if _onednn_linear is not None:  # the oneDNN linear the skeleton zoo steps its frames with
    _RULES[_onednn_linear] = _onednn_linear_rule
_onednn_conv = getattr(getattr(torch.ops, "mkldnn", None), "_convolution_pointwise", None)
if _onednn_conv is not None:  # the oneDNN convolution with packed kernels 3D CNNs step with
    _RULES[_onednn_conv] = _conv
_register(["_safe_softmax"], _activation)
# fused attention kernels (inference mode) count as their decomposition (autograd on) does
_register(["scaled_dot_product_attention", "_scaled_dot_product_attention_math",
           "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
           "_scaled_dot_product_cudnn_attention"], _sdpa)
_register(["_scaled_dot_product_flash_attention_for_cpu"], _sdpa_cpu)
_register(["_native_multi_head_attention"], _native_mha)
_register(["_transformer_encoder_layer_fwd"], _native_encoder_layer)


class PtflopsCounter(TorchDispatchMode):
    """A context manager counting ptflops-convention MACs of the ATen operations run inside.

    ``total`` holds the MACs, ``by_op`` the MACs per operation name.

    Example:
        >>> import torch
        >>> from costream.bench import PtflopsCounter
        >>> conv, bn = torch.nn.Conv1d(4, 8, 3, bias=False), torch.nn.BatchNorm1d(8).eval()
        >>> with PtflopsCounter() as counter:
        ...     _ = torch.relu(bn(conv(torch.randn(1, 4, 5))))
        >>> counter.total  # conv 3 x 8 x (4 x 3), BN 2 x 24, ReLU 24
        360
    """

    def __init__(self) -> None:
        super().__init__()
        self.total = 0
        self.by_op: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        rule = _RULES.get(func.overloadpacket)
        if rule is not None:
            macs = int(rule(args, kwargs, out))
            self.total += macs
            self.by_op[func.overloadpacket.__name__] += macs
        return out


def ptflops_macs(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> int:
    """ptflops-convention MACs of ``fn(*args, **kwargs)`` (run under ``torch.no_grad``).

    For a clip, pass the offline model: ``ptflops_macs(model, clip)``; with the model and the
    clip on the ``meta`` device nothing is computed.

    Example:
        >>> import torch
        >>> from costream.bench import ptflops_macs
        >>> net = torch.nn.Sequential(torch.nn.Conv3d(3, 8, 3, padding=1), torch.nn.ReLU())
        >>> ptflops_macs(net.to("meta"), torch.empty(1, 3, 4, 8, 8, device="meta"))
        169984
        >>> 2048 * (3 * 27) + 2048 + 2048  # 2048 outputs: conv, bias, ReLU
        169984
    """
    with torch.no_grad(), PtflopsCounter() as counter:
        fn(*args, **kwargs)
    return counter.total


def ptflops_step_macs(module: nn.Module, frame: Tensor, *, per: str = "step") -> float:
    """ptflops-convention MACs of one continual step, in steady state.

    On real tensors the module's stream is restarted, warmed up with ``delay + 1`` copies of
    ``frame`` (one ``forward_steps`` call), and the next ``stride`` calls of
    ``forward_step(frame)`` are counted; the stream is restarted again afterwards. The layers
    are counted as the network defines them: batch norms that a step folds into the
    convolution before them (``costream.Sequential``'s fusion) count as in ptflops. On ``meta``
    tensors (no values, so no stateful bookkeeping) the pure ``step`` over a fresh explicit
    state is counted instead: it executes every layer's per-step work at every age (the
    warm-up is masked, not skipped), which equals the steady state of ``forward_step`` except
    for temporally strided convolutions (the pure step computes all their taps).

    Args:
        module: a continual module (``forward_step``, ``temporal``).
        frame: one input frame ``(B, C, *spatial)``.
        per: ``"step"``: MACs per input frame, averaged over one stride period;
            ``"peak"``: the most expensive step of the period (one that emits an output; what
            a profiler of one emitting ``forward_step`` reports, the convention of the Co3D
            paper for CoI3D); ``"output"``: the period's MACs per emitted output. The three
            agree for networks without temporal stride.

    Example:
        >>> import torch, costream
        >>> from costream.bench import ptflops_step_macs
        >>> conv = costream.Conv1d(4, 8, 3, padding=1, bias=False)
        >>> net = costream.Sequential(conv, torch.nn.ReLU())
        >>> ptflops_step_macs(net, torch.randn(1, 4))  # 8 x (4 x 3), 2 x 8 partial sums, 8 ReLU
        120.0
    """
    if per not in ("step", "peak", "output"):
        raise ValueError(f"per must be 'step', 'peak' or 'output', got {per!r}")
    with unfused():  # the network's layers as published, batch norms included
        return _step_macs(module, frame, per)


def _step_macs(module: nn.Module, frame: Tensor, per: str) -> float:
    stride = module.temporal.stride
    counts: list[int] = []
    outputs = 0
    if frame.device.type == "meta":
        state = module.init_state(frame.shape[0], tuple(frame.shape[1:]), device=frame.device,
                                  dtype=frame.dtype)
        with torch.no_grad():
            for _ in range(stride):
                with PtflopsCounter() as counter:
                    y, state = module.step(frame, state)
                counts.append(counter.total)
                outputs += y is not None
    else:
        module.reset_state()
        try:
            with torch.inference_mode():
                warm = frame.unsqueeze(2).expand(*frame.shape[:2], module.temporal.delay + 1,
                                                 *frame.shape[2:])
                module.forward_steps(warm.contiguous())
                for _ in range(stride):
                    with PtflopsCounter() as counter:
                        y = module.forward_step(frame)
                    counts.append(counter.total)
                    outputs += y is not None
        finally:
            module.reset_state()
    if per == "output":
        return sum(counts) / max(1, outputs)
    if per == "peak":
        return float(max(counts))
    return sum(counts) / stride
