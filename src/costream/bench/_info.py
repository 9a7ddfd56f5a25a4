"""``costream info``: the temporal geometry and stream state of a continual model."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from ._workloads import Workload

__all__ = ["describe", "format_info"]


def _leaves(tree: Any, module: nn.Module | None, path: str = "") -> Iterator[tuple[str, Tensor]]:
    """``(path, tensor)`` of a state tree; tuple levels that match a container's children are
    named after them, other levels by index."""
    if isinstance(tree, Tensor):
        yield path or "state", tree
    elif isinstance(tree, dict):
        for key, value in tree.items():
            yield from _leaves(value, module, f"{path}.{key}" if path else str(key))
    elif isinstance(tree, (tuple, list)):
        children = list(module.named_children()) if module is not None else []
        named = len(children) == len(tree)
        for i, value in enumerate(tree):
            if named:
                name, child = children[i]
                yield from _leaves(value, child, f"{path}.{name}" if path else name)
            else:
                yield from _leaves(value, None, f"{path}[{i}]")


def describe(w: Workload, batch_size: int = 1) -> dict[str, Any]:
    """Receptive field, delay, stride, padding, parameters and the fresh state's tensors.

    Example:
        >>> from costream.bench import resolve_workload
        >>> from costream.bench._info import describe
        >>> info = describe(resolve_workload("tcn"))
        >>> info["receptive_field"], info["delay"], len(info["state"])
        (21, 20, 10)
    """
    net = w.net
    geom = net.temporal
    dtype = next((p.dtype for p in net.parameters() if p.is_floating_point()), torch.float32)
    with torch.inference_mode():
        state = net.init_state(batch_size, w.frame_shape, dtype=dtype)
    tensors = [{"path": path, "shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."),
                "bytes": t.numel() * t.element_size()} for path, t in _leaves(state["tree"], net)]
    return {
        "model": w.name, "description": w.description, "frame_shape": list(w.frame_shape),
        "clip_frames": w.clip_length, "receptive_field": geom.receptive_field,
        "delay": geom.delay, "stride": geom.stride, "padding": geom.padding,
        "end_padding": geom.end_padding, "params": sum(p.numel() for p in net.parameters()),
        "batch_size": batch_size, "state": tensors,
        "state_bytes": sum(t["bytes"] for t in tensors),
    }


def format_info(info: dict[str, Any]) -> str:
    """:func:`describe` output as text.

    Example:
        >>> from costream.bench import resolve_workload
        >>> from costream.bench._info import describe, format_info
        >>> print(format_info(describe(resolve_workload("tcn"))).splitlines()[3])
        receptive field  21 frames
    """
    from ._report import _bytes

    lines = [
        f"{info['model']}: {info['description']}".rstrip(": "),
        f"parameters       {info['params']:,}",
        f"frame shape      {tuple(info['frame_shape'])} (clip: {info['clip_frames']} frames)",
        f"receptive field  {info['receptive_field']} frames",
        f"delay            {info['delay']} steps (the first output is due at step "
        f"{info['delay'] + 1})",
        f"stride           {info['stride']} (one output every {info['stride']} step(s))",
        f"padding          {info['padding']} frames at the start, {info['end_padding']} at "
        f"the end (offline)",
        f"state            {len(info['state'])} tensors, {_bytes(info['state_bytes'])} "
        f"(batch {info['batch_size']})",
    ]
    width = max((len(t["path"]) for t in info["state"]), default=0)
    lines += [f"  {t['path'].ljust(width)}  {tuple(t['shape'])} {t['dtype']}"
              for t in info["state"]]
    return "\n".join(lines)
