"""MAC counting: what a network executes, and what one output frame theoretically costs.

Counts come from :class:`torch.utils.flop_counter.FlopCounterMode`, which counts the FLOPs of
matrix multiplications and convolutions (2 per multiply-accumulate) and nothing else. Every
function here returns multiply-accumulates (MACs): FLOPs // 2, the convention of ptflops-style
figures for convolutions and linear layers. Element-wise work (bias, batch norm, activations,
partial-sum additions) is not included.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["count_macs", "step_macs", "theoretical_step_macs"]


def count_macs(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> int:
    """MACs of the matrix multiplications and convolutions executed by ``fn(*args, **kwargs)``.

    Example:
        >>> import torch
        >>> from costream.bench import count_macs
        >>> conv = torch.nn.Conv1d(4, 8, 3)
        >>> count_macs(conv, torch.randn(1, 4, 5))  # 3 outputs x 8 x 4 x 3
        288
    """
    with FlopCounterMode(display=False) as counter:
        fn(*args, **kwargs)
    return int(counter.get_total_flops()) // 2


def _delay(module: nn.Module) -> int:
    temporal = getattr(module, "temporal", None)
    delay = getattr(temporal, "delay", None)
    if delay is None:
        delay = getattr(module, "delay", 0)
    return int(delay)


def _reset(module: nn.Module) -> None:
    reset = getattr(module, "reset_state", None) or getattr(module, "clean_state", None)
    if reset is None:
        raise TypeError(f"{type(module).__name__} has neither reset_state nor clean_state")
    reset()


def step_macs(module: nn.Module, frame: Tensor | tuple[Tensor, ...], steps: int = 1) -> int:
    """MACs executed by ``steps`` steady-state calls of ``module.forward_step(frame)``.

    The module's stream is restarted, stepped ``delay + 2`` times with ``frame`` so that every
    layer is past its warm-up, and then the next ``steps`` steps are counted. The stream is
    restarted again afterwards. Works for costream modules (``reset_state``) and for modules
    of ``continual-inference`` (``clean_state``). With a temporal stride ``s`` in the network,
    pass ``steps=s`` to count one whole period. Paired temporal convs (``Conv3d`` with 3-5
    taps, stride and dilation 1 in time) split their work unevenly between a pair's two
    steps: count an even number of steps (``steps=2``, or a multiple of ``2 * s``) for the
    MACs per step on average.

    Example:
        >>> import torch, costream
        >>> from costream.bench import step_macs
        >>> conv = costream.Conv1d(4, 8, 3, padding=1)
        >>> step_macs(conv, torch.randn(1, 4))  # one output frame: 8 x 4 x 3
        96
    """
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    _reset(module)
    try:
        with torch.inference_mode():
            for _ in range(_delay(module) + 2):
                module.forward_step(frame)

            def run() -> None:
                for _ in range(steps):
                    module.forward_step(frame)

            return count_macs(run)
    finally:
        _reset(module)


def _is_leaf(module: nn.Module) -> bool:
    return next(module.children(), None) is None


def _time_steps(y: Any) -> int:
    if isinstance(y, (tuple, list)):
        y = next((v for v in y if isinstance(v, Tensor)), None)
    if not isinstance(y, Tensor) or y.dim() < 3:
        return 1
    return max(1, int(y.shape[2]))


def theoretical_step_macs(torch_model: nn.Module, clip: Tensor | tuple[Tensor, ...]) -> int:
    """MACs of producing one output frame of every layer of the offline ``torch_model``.

    The model runs once on ``clip`` ``(B, C, T, *spatial)``; every leaf module that executes
    matrix multiplications or convolutions has its MACs divided by its number of output time
    steps (dim 2 of its output; outputs without a time dimension count as one step), and the
    results are summed. For a network without temporal stride this is the cost of one step of
    an ideal continual version.

    Example:
        >>> import torch
        >>> from costream.bench import theoretical_step_macs
        >>> net = torch.nn.Sequential(torch.nn.Conv1d(4, 8, 3, padding=1), torch.nn.ReLU(),
        ...                           torch.nn.Conv1d(8, 2, 3, padding=1))
        >>> theoretical_step_macs(net, torch.randn(1, 4, 10))  # 8*4*3 + 2*8*3
        144
    """
    per_frame: list[int] = []

    def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        macs = count_macs(module.forward, *args, **kwargs)
        if macs:
            per_frame.append(macs // _time_steps(output))

    handles = [m.register_forward_hook(hook, with_kwargs=True)
               for m in torch_model.modules() if _is_leaf(m)]
    try:
        with torch.inference_mode():
            torch_model(clip)
    finally:
        for h in handles:
            h.remove()
    return sum(per_frame)
