"""Step-time fusion inside :class:`costream.Sequential`: a convolution, the eval-mode batch norm
after it and the activation after that step together.

A convolution whose kernel is 1 in time and 1 in space (X3D's expansions and projections,
ResNet bottlenecks, 1x1 Conv1d layers) keeps no state: its step is a matrix product over the
frame's pixels. The batch norm after it is folded into the product's weights and bias (derived
once, re-derived when a parameter, a running statistic or ``eps`` changes), and the activation
after that runs inside oneDNN's product (a post-op) or in place on the product's fresh output.

A convolution with temporal taps keeps partial sums, which must stay those of the network as
defined (chunked steps and flushes continue them module by module): there the batch norm and
the activation form the conv's :class:`Epilogue`, the pass that writes the step's output (the
due partial sum, strided inside the taps) as a dense tensor, instead of a copy, a batch-norm
pass and an activation pass. Each removed pass reads and writes a whole activation, which is
what a step over large frames pays for; each removed call is a few microseconds of dispatch,
which is what a step over small frames pays for. Offline ``forward``, chunked steps and flushes
run the modules one by one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._cache import DerivedCache
from ._onednn import POST_OPS, linear

#: Activations stepped inside the product, by oneDNN's post-op name (see
#: :data:`costream.modules._onednn.POST_OPS`).
_ACTIVATIONS: dict[type[nn.Module], str] = {
    nn.ReLU: "relu", nn.SiLU: "swish", nn.Hardswish: "hardswish", nn.Sigmoid: "sigmoid",
    nn.Tanh: "tanh",
}
_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
#: The same activations out of place (they write the epilogue's dense output).
_OUT_OF_PLACE: dict[str, Callable[[Tensor], Tensor]] = {
    "relu": torch.relu, "swish": F.silu, "hardswish": F.hardswish, "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
}

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
#: step computes are left alone unless they register here; a registered class's ``_step``
#: takes the ``epilogue`` argument of :meth:`costream.modules._conv._CoConvNd._step`).
FUSABLE_CONVS: set[type] = set()


def _fusable_conv(conv: nn.Module) -> bool:
    """A continual conv whose class steps as :class:`costream.modules._conv._CoConvNd` does (a
    subclass that changes what a step computes is left alone unless it registers)."""
    from ._conv import _CoConvNd

    if not isinstance(conv, _CoConvNd):
        return False
    for cls in type(conv).__mro__:
        if cls is _CoConvNd:
            return True
        if cls not in FUSABLE_CONVS and any(n in vars(cls) for n in (
                "_step", "_contributions", "_frame_out", "_update", "_init", "_lean_step",
                "_lean_frame_step", "_strided_update")):
            return False
    return False


def _plain_conv(conv: nn.Module) -> bool:
    """A fusable conv 1 x 1 x ... in time and space, no groups, no padding: its step is
    ``x W^T + b`` over the pixels."""
    return (all(k == 1 for k in conv.kernel_size) and conv.stride[0] == 1 and conv.groups == 1
            and conv.padding_mode == "zeros" and conv._span == 0 and not any(conv._tpad)
            and not any(conv._spad))


def fuse_plan(modules: list[nn.Module], plan: list[tuple[int, bool, Callable]]) -> list:
    """The step plan of a Sequential with ``conv -> [batch norm] -> [activation]`` runs fused."""
    out, i = [], 0
    while i < len(plan):
        m = modules[i]
        if _fusable_conv(m):
            j, bn, act = i + 1, None, None
            if j < len(modules) and type(modules[j]) in _BATCH_NORMS \
                    and modules[j].num_features == m.out_channels:
                bn, j = modules[j], j + 1
            if j < len(modules) and type(modules[j]) in _ACTIVATIONS:
                act, j = modules[j], j + 1
            if bn is not None or act is not None:
                rest = [plan[n][2] for n in range(i + 1, j)]
                kind = PointwiseConvStep if _plain_conv(m) else EpilogueConvStep
                out.append((i, True, kind(m, bn, act, plan[i][2], rest)))
                i = j
                continue
        out.append(plan[i])
        i += 1
    return out


def _bn_affine(bn: nn.Module) -> tuple[Tensor, Tensor]:
    """An eval batch norm as ``x * scale + shift`` (per channel)."""
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = -bn.running_mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    return scale, shift


def _bn_sources(bn: nn.Module) -> tuple:
    """What a batch norm's folded form derives from: its tensors and ``eps``."""
    return bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps


def _folds(bn: nn.Module | None) -> bool:
    """Whether ``bn`` (if any) is an eval batch norm with running statistics."""
    return bn is None or (not bn.training and bn.running_mean is not None)


class _FusedStep:
    """One step of ``conv -> [bn] -> [act]``; module by module (:meth:`_unfused`) where folding
    does not hold: a batch norm in training mode or without running statistics (its own step
    then says why)."""

    def __init__(self, conv: nn.Module, bn: nn.Module | None, act: nn.Module | None,
                 conv_step: Callable, rest: list[Callable]) -> None:
        self.conv, self.bn = conv, bn
        self.attr = _ACTIVATIONS[type(act)] if act is not None else "none"
        self.conv_step, self.rest = conv_step, rest

    def _unfused(self, x: Any, state: Any, age: Any, phase: int):
        y, state, age, phase = self.conv_step(x, state, age, phase)
        if y is not None:
            for fn in self.rest:
                y = fn(y)
        return y, state, age, phase


class PointwiseConvStep(_FusedStep):
    """A pointwise conv's step with the norm folded into its product and the activation run
    by the product (see the module docstring)."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.cache = DerivedCache(self._fold)

    def _fold(self) -> tuple[Tensor, Tensor | None]:
        conv, bn = self.conv, self.bn
        w = conv.weight.reshape(conv.out_channels, conv.in_channels)
        b = conv.bias
        if bn is not None:
            scale, shift = _bn_affine(bn)
            w = w * scale.unsqueeze(1)
            b = shift if b is None else shift + b * scale
            b = b.to(w.dtype)
        return w.contiguous(), b

    def __call__(self, x: Any, state: Any, age: Any, phase: int):
        bn = self.bn
        if not _ENABLED[0] or not _folds(bn):
            return self._unfused(x, state, age, phase)
        conv = self.conv
        if not isinstance(x, Tensor) or x.dim() != conv._ndim + 1:
            return self._unfused(x, state, age, phase)
        if bn is None:
            w, b = self.cache.get(conv.weight, conv.bias)
        else:
            w, b = self.cache.get(conv.weight, conv.bias, *_bn_sources(bn))
        strides = conv.stride[1:]
        if any(s != 1 for s in strides):
            x = x[(slice(None), slice(None), *(slice(None, None, s) for s in strides))]
        # (B, *S, C): a view of channels-last frames
        y = linear(x.movedim(1, -1), w, b, self.attr)
        return conv._emit(y.movedim(-1, 1), state, age, phase)


class Epilogue:
    """The eval batch norm and activation after a temporal conv, applied by the conv's step as
    it writes the due output: ``act(y * scale + shift)`` (the multiply-add, then the
    activation in place on its output), or ``act(y)``: out of place, or in place on a
    ``fresh`` output (one the conv has just written and nothing else holds).

    ``rest`` (the modules' own steps) runs instead where the folded form does not apply: an
    output of another dtype than the norm's (CPU autocast).
    """

    def __init__(self, conv: nn.Module, bn: nn.Module | None, attr: str,
                 rest: list[Callable]) -> None:
        self.conv, self.bn, self.attr, self.rest = conv, bn, attr, rest
        self.cache = DerivedCache(self._affine)
        self._kernel = DerivedCache(self._folded_kernel)
        self._pair = DerivedCache(self._folded_pair_kernel)
        self._last = DerivedCache(self._folded_last_kernel)

    def _affine(self) -> tuple[Tensor, Tensor]:
        return _bn_affine(self.bn)

    def _folded_kernel(self) -> tuple[Tensor, Tensor]:
        w, b = self.conv.weight, self.conv.bias
        scale, shift = _bn_affine(self.bn)
        w = w * scale.view(-1, *(1,) * (w.dim() - 1))
        b = shift if b is None else shift + b * scale
        return w.contiguous(), b.to(w.dtype)

    def _folded_pair_kernel(self) -> tuple[Tensor, Tensor]:
        return self.conv._pair_kernel(*self._folded_kernel())

    def _folded_last_kernel(self) -> tuple[Tensor, Tensor]:
        return self.conv._last_kernel(*self._folded_kernel())

    def pair_caches(self, conv: nn.Module) -> tuple[DerivedCache, DerivedCache, tuple]:
        """For a conv stepping in pairs (a paired 3D conv) with this norm folded in: the caches
        of its kernels for a pair's first step and for its last product, and the tensors they
        derive from (the activation is then all that is left: :meth:`activate`)."""
        params = conv._parameters
        return self._pair, self._last, (params["weight"], params["bias"],
                                        *_bn_sources(self.bn))

    def activate(self, y: Tensor) -> Tensor:
        """The activation alone, in place on a fresh output (the norm folded upstream)."""
        return y if self.attr == "none" else POST_OPS[self.attr](y)

    def kernel_cache(self, conv: nn.Module) -> tuple[DerivedCache, tuple]:
        """For a conv whose step computes complete outputs (a buffered 3D conv): the cache of
        its kernel and bias with this norm folded in, and the tensors they derive from (the
        activation then runs as oneDNN's post-op :attr:`attr`)."""
        params = conv._parameters
        if self.bn is None:
            return conv._buffer_cache, (params["weight"], params["bias"])
        return self._kernel, (params["weight"], params["bias"], *_bn_sources(self.bn))

    @property
    def post_op(self) -> str | None:
        """The activation as a oneDNN post-op (:data:`POST_OPS` key) where it is the whole
        epilogue (no norm), else ``None``."""
        return self.attr if self.bn is None else None

    def __call__(self, y: Tensor, fresh: bool = False) -> Tensor:
        bn = self.bn
        if bn is None:
            return (POST_OPS if fresh else _OUT_OF_PLACE)[self.attr](y)
        scale, shift = self.cache.get(*_bn_sources(bn))
        if y.dtype != scale.dtype:
            if y.dim() == 4 and y.device.type == "cpu":
                y = y.contiguous(memory_format=torch.channels_last)
            for fn in self.rest:
                y = fn(y)
            return y
        shape = (1, -1) + (1,) * (y.dim() - 2)
        # on a fresh output in place (no new tensor to write: 1.2-2x faster on 48-96 channel
        # frames, torch 2.13 on an AVX-512 EPYC); autograd records no writes into a given tensor
        inplace = fresh and not y.requires_grad
        out = torch.addcmul(shift.view(shape), y, scale.view(shape), out=y if inplace else None)
        if self.attr != "none":
            POST_OPS[self.attr](out)  # in place: the multiply-add's own output
        return out


class EpilogueConvStep(_FusedStep):
    """A temporal conv's step with the norm and activation as its :class:`Epilogue`."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.epilogue = Epilogue(self.conv, self.bn, self.attr, self.rest)

    def __call__(self, x: Any, state: Any, age: Any, phase: int):
        if not _ENABLED[0] or not _folds(self.bn):
            return self._unfused(x, state, age, phase)
        return self.conv_step(x, state, age, phase, self.epilogue)
