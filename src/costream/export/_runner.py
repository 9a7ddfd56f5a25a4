"""Drive an exported continual model in onnxruntime, from a fresh state."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

_DTYPES = {"float32": np.float32, "float64": np.float64, "float16": np.float16,
           "int64": np.int64, "bool": np.bool_}


class OnnxStreamRunner:
    """Step an ONNX model written by :func:`costream.export.export_onnx`.

    Args:
        path: the ``.onnx`` file (its ``.json`` manifest lies next to it).
        providers: onnxruntime execution providers (default: CPU).
        threads: intra-op threads of the session (default: onnxruntime's choice).
        spin: whether idle intra-op threads spin-wait for the next step (onnxruntime's
            default; lowest latency, but they keep cores busy that other work may need).

    Example:
        >>> import os, tempfile, torch, costream as cs
        >>> from costream.export import export_onnx, OnnxStreamRunner
        >>> net = cs.Conv1d(2, 3, 3).eval()
        >>> path = os.path.join(tempfile.mkdtemp(), "conv.onnx")
        >>> _ = export_onnx(net, path, (2,))
        >>> runner = OnnxStreamRunner(path)
        >>> len(runner.run(torch.randn(1, 2, 5).numpy()))  # 5 frames, receptive field 3
        3
    """

    def __init__(self, path: str | os.PathLike, providers: list[str] | None = None, *,
                 threads: int | None = None, spin: bool = True) -> None:
        import onnxruntime as ort

        path = Path(path)
        self.manifest: dict[str, Any] = json.loads(
            path.with_suffix(path.suffix + ".json").read_text())
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = int(threads)
        if not spin:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path), options,
                                            providers=providers or ["CPUExecutionProvider"])
        self._dir = path.parent
        self.reset()

    @property
    def delay(self) -> int:
        return int(self.manifest["delay"])

    @property
    def stride(self) -> int:
        return int(self.manifest["stride"])

    def reset(self) -> None:
        """Start every stream afresh (initial state from the manifest)."""
        m = self.manifest
        self._state: list[np.ndarray] = []
        saved = None
        for entry in m["state"]:
            dt = _DTYPES[entry["dtype"]]
            if "fill" in entry:
                self._state.append(np.full(entry["shape"], float(entry["fill"]), dtype=dt))
            else:
                import torch

                saved = saved or torch.load(self._dir / entry["init_file"], weights_only=True)
                self._state.append(saved[entry["name"]].numpy())
        self._age = np.zeros(m["batch_size"], dtype=np.int64)

    def step(self, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Feed ``stride`` frames ``(B, C, stride, *spatial)``: (output, per-stream ready flag)."""
        m = self.manifest
        feeds = {"x": np.ascontiguousarray(frames, dtype=_DTYPES[m["dtype"]]), "age": self._age}
        feeds.update(zip(m["inputs"][2:], self._state, strict=True))
        emit_age = self._age + (self.delay % self.stride)
        y, age, *state = self.session.run(None, feeds)
        self._age, self._state = age, state
        return y, emit_age >= self.delay

    def run(self, clip: np.ndarray) -> list[np.ndarray]:
        """Feed a clip ``(B, C, T, ...)`` (``T`` a multiple of ``stride``); return the outputs
        that became due, in order (all streams start together)."""
        s = self.stride
        if clip.shape[2] % s:
            raise ValueError(f"clip length {clip.shape[2]} is not a multiple of stride {s}")
        outs = []
        for i in range(0, clip.shape[2], s):
            y, ready = self.step(clip[:, :, i: i + s])
            if ready.all():
                outs.append(y)
        return outs
