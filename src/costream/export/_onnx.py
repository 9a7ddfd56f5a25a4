"""ONNX export of the pure stride step, with a JSON manifest of the stream state.

The exported graph takes ``(x, age, *state)`` and returns ``(y, age, *state)``: ``x`` holds
``stride`` frames ``(B, C, stride, *spatial)``, ``y`` the one output they make due, ``age``
the per-stream frame count. Every call emits one output, so the graph has no conditional
outputs; outputs of streams younger than ``delay`` frames are warm-up filler. The manifest
(``<model>.json``) lists the state tensors with their shapes, dtypes and initial values.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..core._module import CoModule
from ..core._tree import tree_leaves, tree_unflatten

FORMAT = "costream-onnx/1"


class _StrideStep(nn.Module):
    """``step_stride`` with a flat state, for the exporter."""

    def __init__(self, module: CoModule, template: Any) -> None:
        super().__init__()
        self.module = module
        self.template = template

    def forward(self, x: Tensor, age: Tensor, *leaves: Tensor) -> tuple[Tensor, ...]:
        tree = tree_unflatten(self.template, list(leaves))
        y, state = self.module.step_stride(x, {"tree": tree, "age": age, "phase": 0})
        # an output that is an input (a delay line shifts its frames: the output and most of
        # the new state are old state) would make the exporter rename that graph input after
        # the output: copy, so every name stays as declared
        return (y.clone(), state["age"], *[t.clone() for _, t in tree_leaves(state["tree"])])


def _fill_value(t: Tensor) -> float | None:
    flat = t.reshape(-1)
    if flat.numel() == 0:
        return 0.0
    v = flat[0]
    return float(v) if bool((flat == v).all()) else None


def export_onnx(module: CoModule, path: str | os.PathLike, frame_shape: tuple[int, ...], *,
                batch_size: int = 1, dtype: torch.dtype = torch.float32,
                optimize: bool = True) -> dict[str, Any]:
    """Export ``module``'s stride step to ONNX at ``path`` and write ``path`` + ``.json``.

    Uses the exporter of the installed torch (``torch.onnx.export(..., dynamo=True)``). The
    module is exported in eval mode; afterwards every submodule is back in its own mode (a
    model with frozen batch norms comes back with them frozen). Offline-only models
    (``streamable`` false, e.g. X3D with clip-scope squeeze-excitation) have no step and are
    refused.

    Args:
        module: the continual module.
        path: where to write the ``.onnx`` file.
        frame_shape: one input frame without the batch dimension, ``(C, *spatial)``.
        batch_size: number of streams the graph steps at once.
        dtype: floating-point type of the frames and the state.
        optimize: run the exporter's graph optimiser (slower export, several times faster
            onnxruntime steps for deep networks).

    Returns:
        The manifest (also written next to the model).

    Example:
        >>> import os, tempfile, costream as cs
        >>> from costream.export import export_onnx
        >>> path = os.path.join(tempfile.mkdtemp(), "conv.onnx")
        >>> manifest = export_onnx(cs.Conv1d(2, 3, 3), path, frame_shape=(2,))
        >>> manifest["delay"], manifest["frames_per_call"], len(manifest["state"])
        (2, 1, 1)
        >>> os.path.exists(path + ".json")
        True
    """
    if not isinstance(module, CoModule):
        raise TypeError("export_onnx needs a continual module (use costream.continual first)")
    if not getattr(module, "streamable", True):
        raise ValueError(f"{type(module).__name__} is an offline model (streamable=False): it "
                         f"only runs on whole clips, so it has no step to export; export its "
                         f"continual version instead")
    path = Path(path)
    modes = [(m, m.training) for m in module.modules()]  # each submodule's own flag
    module.eval()
    try:
        state = module.init_state(batch_size, tuple(frame_shape), dtype=dtype)
        named = list(tree_leaves(state["tree"]))
        names = [f"state.{n}" for n, _ in named]
        leaves = [t for _, t in named]
        stride = module.temporal.stride
        x = torch.zeros(batch_size, *frame_shape[:1], stride, *frame_shape[1:], dtype=dtype,
                        device=state["age"].device)
        wrapper = _StrideStep(module, state["tree"]).eval()
        with torch.no_grad():
            example = wrapper(x, state["age"], *leaves)
            torch.onnx.export(
                wrapper, (x, state["age"], *leaves), str(path),
                input_names=["x", "age", *names],
                output_names=["y", "age_out", *[f"{n}.out" for n in names]],
                dynamo=True, verbose=False, optimize=optimize,
            )
    finally:
        for m, training in modes:
            m.training = training
    t = module.temporal
    manifest = {
        "format": FORMAT,
        "model": os.path.basename(path),
        "batch_size": batch_size,
        "frame_shape": list(frame_shape),
        "dtype": str(dtype).replace("torch.", ""),
        "receptive_field": t.receptive_field,
        "delay": t.delay,
        "stride": stride,
        "frames_per_call": stride,
        "output_shape": list(example[0].shape),
        "inputs": ["x", "age", *names],
        "outputs": ["y", "age_out", *[f"{n}.out" for n in names]],
        "state": [],
    }
    init_file = None
    for name, leaf in zip(names, leaves, strict=True):
        fill = _fill_value(leaf)
        entry: dict[str, Any] = {"name": name, "shape": list(leaf.shape),
                                 "dtype": str(leaf.dtype).replace("torch.", "")}
        if fill is not None:
            entry["fill"] = "-inf" if fill == -math.inf else ("inf" if fill == math.inf else fill)
        else:
            init_file = init_file or path.with_suffix(".init.pt")
            entry["init_file"] = init_file.name
        manifest["state"].append(entry)
    if init_file is not None:
        torch.save({n: t for n, t in zip(names, leaves, strict=True)}, init_file)
    path.with_suffix(path.suffix + ".json").write_text(json.dumps(manifest, indent=2))
    return manifest
