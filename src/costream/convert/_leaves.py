"""Leaf conversions for traced graphs: weight-normed and parametrized layers, functional
convolutions and pools."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..modules import _conv, _pool

_CONV = {1: _conv.Conv1d, 2: _conv.Conv2d, 3: _conv.Conv3d}
_TORCH_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def old_weight_norm(module: nn.Module) -> Any:
    """The ``torch.nn.utils.weight_norm`` hook of ``module``, if it has one."""
    from torch.nn.utils.weight_norm import WeightNorm

    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, WeightNorm):
            return hook
    return None


def is_reparametrized(module: nn.Module) -> bool:
    """Weight-normed (old hook style) or parametrized (``torch.nn.utils.parametrizations``)."""
    return parametrize.is_parametrized(module) or old_weight_norm(module) is not None


def convert_reparametrized(module: nn.Module) -> nn.Module | None:
    """A continual conv whose weight is computed like ``module``'s, with the same names."""
    conv_type = next((t for t in _TORCH_CONV if isinstance(module, t)), None)
    if conv_type is None:
        return None
    if parametrize.is_parametrized(module) and set(module.parametrizations) != {"weight"}:
        return None
    cls = _CONV[_TORCH_CONV.index(conv_type) + 1]
    new = cls(module.in_channels, module.out_channels, module.kernel_size,
              stride=module.stride, padding=module.padding, dilation=module.dilation,
              groups=module.groups, bias=module.bias is not None,
              padding_mode=module.padding_mode, device="meta")
    del new._parameters["weight"]
    hook = old_weight_norm(module)
    if hook is not None:
        new.__class__ = _subclass(cls, "WeightNormed", _OldWeightNorm)
        new.register_parameter(hook.name + "_g", getattr(module, hook.name + "_g"))
        new.register_parameter(hook.name + "_v", getattr(module, hook.name + "_v"))
        new._wn_dim = hook.dim
        new._wn_name = hook.name
    else:
        new.__class__ = _subclass(cls, "Parametrized", _Parametrized)
        new.add_module("parametrizations", module.parametrizations)
    new.bias = module.bias
    new._lean = False
    new._weight_key = None
    new._weight_value = None
    new.train(module.training)
    return new


_SUBCLASSES: dict[tuple[type, str], type] = {}


def _subclass(cls: type, prefix: str, mixin: type) -> type:
    key = (cls, prefix)
    if key not in _SUBCLASSES:
        _SUBCLASSES[key] = type(f"{prefix}{cls.__name__}", (mixin, cls), {})
    return _SUBCLASSES[key]


class _Computed:
    """A conv whose ``weight`` is computed from other parameters (cached while unchanged)."""

    def _weight_sources(self) -> tuple[Tensor, ...]:
        raise NotImplementedError

    def _compute_weight(self) -> Tensor:
        raise NotImplementedError

    @property
    def weight(self) -> Tensor:
        src = self._weight_sources()
        if torch.compiler.is_compiling() or torch.is_grad_enabled() or any(
                s.is_inference() for s in src):
            return self._compute_weight()
        key = tuple((s.data_ptr(), s._version, id(s)) for s in src)
        if key != self._weight_key:
            self._weight_value = self._compute_weight()
            self._weight_key = key
        return self._weight_value

    def _wb(self) -> tuple[Tensor, Tensor | None]:
        return self.weight, self._parameters["bias"]


class _OldWeightNorm(_Computed):
    def _weight_sources(self) -> tuple[Tensor, ...]:
        p = self._parameters
        return p[self._wn_name + "_g"], p[self._wn_name + "_v"]

    def _compute_weight(self) -> Tensor:
        g, v = self._weight_sources()
        return torch._weight_norm(v, g, self._wn_dim)


class _Parametrized(_Computed):
    def _weight_sources(self) -> tuple[Tensor, ...]:
        plist = self._modules["parametrizations"]["weight"]
        return tuple(p for p in plist.parameters(recurse=False))

    def _compute_weight(self) -> Tensor:
        return self._modules["parametrizations"]["weight"]()


def time_last_conv(module: nn.Module, k: int) -> nn.Module:
    """A continual conv for a torch conv whose time axis is spatial dim ``k`` (> 0): kernel and
    geometry permuted so time comes first, the weight a view of ``module``'s (not registered:
    ``module`` itself stays in the model for the offline pass and the state_dict)."""
    n = len(module.kernel_size)
    order = [k, *[d for d in range(n) if d != k]]

    def perm(v: Any) -> Any:
        return tuple(v[d] for d in order) if isinstance(v, tuple) else v

    cls = _CONV[n]
    new = cls(module.in_channels, module.out_channels, perm(module.kernel_size),
              stride=perm(module.stride), padding=perm(module.padding),
              dilation=perm(module.dilation), groups=module.groups,
              bias=module.bias is not None, padding_mode=module.padding_mode, device="meta")
    del new._parameters["weight"]
    new.__class__ = _subclass(cls, "TimeLast", _TimeLast)
    new._source = [module]  # a list: not registered as a submodule
    new._time_dim = k
    new.bias = module.bias
    new._lean = False
    new._weight_key = None
    new._weight_value = None
    return new


class _TimeLast(_Computed):
    def _weight_sources(self) -> tuple[Tensor, ...]:
        return (self._source[0].weight,)

    def _compute_weight(self) -> Tensor:
        w = self._source[0].weight
        return w.movedim(2 + self._time_dim, 2).contiguous()

    def _wb(self) -> tuple[Tensor, Tensor | None]:
        return self.weight, self._source[0].bias


# ---------------------------------------------------------------------- functional ops
_F_CONV = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3, torch.conv1d: 1, torch.conv2d: 2,
           torch.conv3d: 3}
_F_POOL = {F.avg_pool1d: ("Avg", 1), F.avg_pool2d: ("Avg", 2), F.avg_pool3d: ("Avg", 3),
           F.max_pool1d: ("Max", 1), F.max_pool2d: ("Max", 2), F.max_pool3d: ("Max", 3),
           torch.avg_pool1d: ("Avg", 1), torch.max_pool1d: ("Max", 1),
           torch.max_pool2d: ("Max", 2), torch.max_pool3d: ("Max", 3)}
_F_ADAPTIVE = {F.adaptive_avg_pool1d: ("Avg", 1), F.adaptive_avg_pool2d: ("Avg", 2),
               F.adaptive_avg_pool3d: ("Avg", 3), F.adaptive_max_pool1d: ("Max", 1),
               F.adaptive_max_pool2d: ("Max", 2), F.adaptive_max_pool3d: ("Max", 3),
               torch.adaptive_avg_pool1d: ("Avg", 1)}


def functional_conv(target: Any, args: tuple, kwargs: dict) -> nn.Module:
    """A continual conv for ``F.convNd(x, weight, bias, stride, padding, dilation, groups)``
    with ``weight`` and ``bias`` given (parameters); shares them without registering them."""
    n = _F_CONV[target]
    names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    bound = dict(zip(names, args))
    bound.update(kwargs)
    weight, bias = bound["weight"], bound.get("bias")
    if not isinstance(weight, nn.Parameter) or (bias is not None and
                                                not isinstance(bias, nn.Parameter)):
        raise ValueError("its weight is computed in forward (only parameters are supported)")
    groups = int(bound.get("groups", 1))
    conv = _CONV[n](weight.shape[1] * groups, weight.shape[0], tuple(weight.shape[2:]),
                    stride=bound.get("stride", 1), padding=bound.get("padding", 0),
                    dilation=bound.get("dilation", 1), groups=groups, bias=bias is not None,
                    device="meta")
    conv.weight = weight
    conv.bias = bias
    return conv


def functional_pool(target: Any, args: tuple, kwargs: dict) -> nn.Module:
    kind, n = _F_POOL[target]
    names = ["input", "kernel_size", "stride", "padding"]
    names += ["dilation", "ceil_mode", "return_indices"] if kind == "Max" else [
        "ceil_mode", "count_include_pad", "divisor_override"][: 3 if n > 1 else 2]
    bound = dict(zip(names, args))
    bound.update(kwargs)
    bound.pop("input")
    if bound.get("stride") in (None, [], ()):
        bound.pop("stride", None)
    return getattr(_pool, f"{kind}Pool{n}d")(**bound)


def functional_adaptive(target: Any, args: tuple, kwargs: dict, window: int) -> nn.Module:
    kind, n = _F_ADAPTIVE[target]
    size = args[1] if len(args) > 1 else kwargs["output_size"]
    return getattr(_pool, f"Adaptive{kind}Pool{n}d")(size, window)
