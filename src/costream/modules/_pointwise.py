"""Plain ``torch.nn`` modules that act on each time step independently.

Such modules keep their own class inside continual containers (so their parameter names and
``state_dict`` keys stay unchanged); a container steps them with :func:`pointwise_step`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

_POINTWISE: set[type[nn.Module]] = {
    nn.Identity, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU,
    nn.SiLU, nn.Mish, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.Softplus,
    nn.Hardtanh, nn.Softsign, nn.Tanhshrink, nn.Threshold, nn.LogSigmoid,
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
}
_CHANNEL_DIM_MODULES = (nn.Softmax, nn.LogSoftmax, nn.Softmin)


def register_pointwise(module_type: type[nn.Module]) -> type[nn.Module]:
    """Declare that ``module_type`` acts on each time step independently (usable as decorator).

    Example:
        >>> import torch, costream as cs
        >>> class Square(torch.nn.Module):
        ...     def forward(self, x):
        ...         return x * x
        >>> _ = cs.register_pointwise(Square)
        >>> net = cs.continual(torch.nn.Sequential(torch.nn.Conv1d(1, 1, 3), Square()))
        >>> net.forward_steps(torch.ones(1, 1, 5)).shape
        torch.Size([1, 1, 3])
    """
    _POINTWISE.add(module_type)
    return module_type


def is_pointwise(module: nn.Module) -> bool:
    """Whether ``module`` is known to act on each time step independently."""
    if type(module) in _POINTWISE:
        return True
    if isinstance(module, _CHANNEL_DIM_MODULES):
        return module.dim == 1
    return False


def pointwise_step(module: nn.Module) -> Callable[[Tensor], Tensor]:
    """A function that applies ``module`` to one frame ``(B, C, *spatial)``."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return _BatchNormStep(module)
    if isinstance(module, nn.modules.dropout._DropoutNd):
        return _DropoutStep(module)
    if type(module) is nn.ReLU:  # the most common case, without nn.functional's dispatch checks
        return torch.relu
    if type(module) is nn.Identity:
        return _identity
    return module.forward


def _identity(x: Tensor) -> Tensor:
    return x


class _BatchNormStep:
    """Eval-mode batch norm of one frame (any number of spatial dims)."""

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm) -> None:
        self.bn = bn

    def __call__(self, x: Tensor) -> Tensor:
        bn = self.bn
        buffers = bn._buffers  # direct lookups: nn.Module.__getattr__ is slow per step
        if bn.training or buffers.get("running_mean") is None:
            if buffers.get("running_mean") is None:
                raise RuntimeError("stepping needs BatchNorm with running statistics")
            raise RuntimeError(
                f"{type(bn).__name__} in training mode normalises over the batch and time of a "
                f"clip; call .eval() before stepping"
            )
        params = bn._parameters
        return torch.batch_norm(x, params.get("weight"), params.get("bias"),
                                buffers["running_mean"], buffers["running_var"], False, 0.0,
                                bn.eps, torch.backends.cudnn.enabled)


class _DropoutStep:
    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __call__(self, x: Tensor) -> Tensor:
        if self.module.training:
            raise RuntimeError("stepping with dropout in training mode; call .eval() first")
        return x
