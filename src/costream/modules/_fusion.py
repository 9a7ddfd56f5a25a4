"""Step-time fusion inside :class:`costream.Sequential`: a pointwise-in-time convolution, the
eval-mode batch norm after it and the activation after that step as one matrix product.

A convolution whose kernel is 1 in time and 1 in space (X3D's expansions and projections,
ResNet bottlenecks, 1x1 Conv1d layers) keeps no state: its step is a matrix product over the
frame's pixels. The batch norm after it is folded into the product's weights and bias (derived
once, re-derived when a parameter or a running statistic changes), and the activation after
that runs inside oneDNN's product (a post-op) or in place on the product's fresh output. Each
removed pass reads and writes a whole activation, which is what a batched step over large
frames pays for. Offline ``forward``, chunked steps and flushes run the modules one by one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from ._cache import DerivedCache
from ._onednn import linear

#: Activations stepped inside the product, by oneDNN's post-op name (see
#: :data:`costream.modules._onednn.POST_OPS`).
_ACTIVATIONS: dict[type[nn.Module], str] = {
    nn.ReLU: "relu", nn.SiLU: "swish", nn.Hardswish: "hardswish", nn.Sigmoid: "sigmoid",
    nn.Tanh: "tanh",
}
_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)

_ENABLED = [True]


@contextlib.contextmanager
def unfused() -> Iterator[None]:
    """Step ``conv -> bn -> act`` triples module by module inside this block (MAC counts in
    the convention of the network as defined, bit-level comparisons with unfused steps)."""
    before = _ENABLED[0]
    _ENABLED[0] = False
    try:
        yield
    finally:
        _ENABLED[0] = before


#: Convolution classes whose step is the convolution itself (subclasses that change what a
#: step computes are left alone unless they register here).
FUSABLE_CONVS: set[type] = set()


def _plain_conv(conv: nn.Module) -> bool:
    """A continual conv of a registered class, 1 x 1 x ... in time and space, no groups, no
    padding: its step is ``x W^T + b`` over the pixels."""
    from ._conv import _CoConvNd

    if not isinstance(conv, _CoConvNd):
        return False
    for cls in type(conv).__mro__:
        if cls is _CoConvNd:
            break
        if cls not in FUSABLE_CONVS and any(n in vars(cls) for n in (
                "_step", "_contributions", "_frame_out", "_update", "_init")):
            return False
    return (all(k == 1 for k in conv.kernel_size) and conv.stride[0] == 1 and conv.groups == 1
            and conv.padding_mode == "zeros" and conv._span == 0 and not any(conv._tpad)
            and not any(conv._spad))


def fuse_plan(modules: list[nn.Module], plan: list[tuple[int, bool, Callable]]) -> list:
    """The step plan of a Sequential with ``conv -> [batch norm] -> [activation]`` runs fused."""
    out, i = [], 0
    while i < len(plan):
        m = modules[i]
        if _plain_conv(m):
            j, bn, act = i + 1, None, None
            if j < len(modules) and type(modules[j]) in _BATCH_NORMS \
                    and modules[j].num_features == m.out_channels:
                bn, j = modules[j], j + 1
            if j < len(modules) and type(modules[j]) in _ACTIVATIONS:
                act, j = modules[j], j + 1
            if bn is not None or act is not None:
                rest = [plan[n][2] for n in range(i + 1, j)]
                out.append((i, True, PointwiseConvStep(m, bn, act, plan[i][2], rest)))
                i = j
                continue
        out.append(plan[i])
        i += 1
    return out


class PointwiseConvStep:
    """One step of ``conv -> [bn] -> [act]`` (see the module docstring).

    Falls back to the modules one by one where folding does not hold: a batch norm in training
    mode or without running statistics (its own step then says why).
    """

    def __init__(self, conv: nn.Module, bn: nn.Module | None, act: nn.Module | None,
                 conv_step: Callable, rest: list[Callable]) -> None:
        self.conv, self.bn = conv, bn
        self.attr = _ACTIVATIONS[type(act)] if act is not None else "none"
        self.conv_step, self.rest = conv_step, rest
        self.cache = DerivedCache(self._fold)

    def _fold(self) -> tuple[Tensor, Tensor | None]:
        conv, bn = self.conv, self.bn
        w = conv.weight.reshape(conv.out_channels, conv.in_channels)
        b = conv.bias
        if bn is not None:
            scale = torch.rsqrt(bn.running_var + bn.eps)
            if bn.weight is not None:
                scale = scale * bn.weight
            shift = -bn.running_mean * scale
            if bn.bias is not None:
                shift = shift + bn.bias
            w = w * scale.unsqueeze(1)
            b = shift if b is None else shift + b * scale
            b = b.to(w.dtype)
        return w.contiguous(), b

    def __call__(self, x: Any, state: Any, age: Any, phase: int):
        bn = self.bn
        if not _ENABLED[0] or (bn is not None and (bn.training or bn.running_mean is None)):
            return self._unfused(x, state, age, phase)
        conv = self.conv
        if not isinstance(x, Tensor) or x.dim() != conv._ndim + 1:
            return self._unfused(x, state, age, phase)
        if bn is None:
            w, b = self.cache.get(conv.weight, conv.bias)
        else:
            w, b = self.cache.get(conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean,
                                  bn.running_var)
        strides = conv.stride[1:]
        if any(s != 1 for s in strides):
            x = x[(slice(None), slice(None), *(slice(None, None, s) for s in strides))]
        # (B, *S, C): a view of channels-last frames
        y = linear(x.movedim(1, -1), w, b, self.attr)
        return conv._emit(y.movedim(-1, 1), state, age, phase)

    def _unfused(self, x: Any, state: Any, age: Any, phase: int):
        y, state, age, phase = self.conv_step(x, state, age, phase)
        if y is not None:
            for fn in self.rest:
                y = fn(y)
        return y, state, age, phase
