"""Step backends: one stride step ``(frames, state) -> (y, state)`` run by eager PyTorch,
``torch.compile``, onnxruntime or OpenVINO.

Every backend takes and returns the state of :meth:`CoModule.init_state` (``tree``, ``age``,
``phase``), so streams can move between backends mid-stream. The onnxruntime and OpenVINO
steps run the graph that :func:`costream.export.export_onnx` writes, fed by its state
manifest (input and output names, in the order of the state's leaves); a graph is exported
for each batch size met (the exported graph has a fixed batch).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..core._module import CoModule
from ..core._tree import tree_leaves, tree_unflatten

#: Step backends, in the order the benchmark reports them.
BACKENDS = ("eager", "compiled", "onnxruntime", "openvino")

StepFn = Callable[[Any, dict], tuple[Any, dict]]


def check_frame_shape(module: CoModule, frame_shape: Any, who: str) -> None:
    """Refuse a frame shape ``(C, *spatial)`` that ``module`` says it cannot take (frame
    dimensions or channels, where it knows them), with one readable line."""
    if not isinstance(frame_shape, (tuple, list)) or not frame_shape:
        raise ValueError(f"{who}: the frame shape must be (C, *spatial), got {frame_shape!r}")
    if isinstance(frame_shape[0], (tuple, list)):  # several inputs: the module checks them
        return
    ndim, channels = module._input_spec()
    if ndim is not None and len(frame_shape) + 1 != ndim:
        raise ValueError(f"{who}: {type(module).__name__} takes frames of {ndim - 1} "
                         f"dimension(s) (C, *spatial), got frame shape {tuple(frame_shape)}")
    if channels is not None and int(frame_shape[0]) != channels:
        raise ValueError(f"{who}: {type(module).__name__} takes {channels} input channels, "
                         f"got frame shape {tuple(frame_shape)}")


def _check_frames(backend: str, x: Any, state: dict[str, Any], stride: int,
                  frame_shape: tuple[int, ...] | None = None,
                  dtype: torch.dtype | None = None) -> None:
    """Refuse frames that do not fit the state (one readable line, not a kernel's error):
    ``x`` must be ``(B, C, stride, *spatial)`` with the state's batch, frame shape and
    dtype (where the state records them, as :meth:`CoModule.init_state` does)."""
    if state["phase"] != 0:
        raise ValueError("a stride step needs a state at phase 0")
    if isinstance(x, tuple):  # several inputs: the module checks them
        return
    if not isinstance(x, Tensor):
        raise TypeError(f"the {backend} step takes a tensor of frames (B, C, stride, "
                        f"*spatial), got {type(x).__name__}")
    age = state["age"]
    batch = age.shape[0] if isinstance(age, Tensor) and age.dim() == 1 else x.shape[0]
    frame_shape = frame_shape if frame_shape is not None else state.get("frame_shape")
    if frame_shape and not isinstance(frame_shape[0], tuple):
        want = (batch, frame_shape[0], stride, *frame_shape[1:])
        if tuple(x.shape) != want:
            raise ValueError(f"the {backend} step takes frames (B, C, stride, *spatial) = "
                             f"{want} for this state, got {tuple(x.shape)}")
    elif x.dim() < 3 or x.shape[0] != batch or x.shape[2] != stride:
        raise ValueError(f"the {backend} step takes frames (B, C, stride, *spatial) with "
                         f"B={batch}, stride={stride}, got {tuple(x.shape)}")
    want_dtype = str(dtype).removeprefix("torch.") if dtype is not None else state.get("dtype")
    if want_dtype is not None and str(x.dtype).removeprefix("torch.") != want_dtype:
        whose = "the backend's" if dtype is not None else "the state's"
        raise TypeError(f"the {backend} step takes {want_dtype} frames ({whose}), got "
                        f"{x.dtype}")


class EagerStep:
    """:meth:`CoModule.step_stride` that takes the layers' steady-state paths (no per-stream
    age masks) once every stream of the batch is past the network's warm-up, as
    ``forward_step`` and :class:`StreamEngine` do."""

    backend = "eager"

    def __init__(self, module: CoModule, reason: str | None = None) -> None:
        self.module = module
        self.compiled = False
        self.reason = reason
        self._stride = module.temporal.stride
        self._warm_up = module._total_delay()

    def __call__(self, x: Any, state: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        _check_frames(self.backend, x, state, self._stride)
        age = state["age"]
        steady = int(age.min()) > self._warm_up
        tree, out = state["tree"], None
        for i in range(self._stride):
            frame = tuple(c[:, :, i] for c in x) if isinstance(x, tuple) else x[:, :, i]
            y, tree, _, _ = self.module._step(frame, tree, None if steady else age + i, i)
            if y is not None:
                out = y
        return out, {**state, "tree": tree, "age": age + self._stride}


class _ExportedStep:
    """Base of the steps that run the exported graph; one graph per batch size met."""

    backend = ""

    def __init__(self, module: CoModule, frame_shape: tuple[int, ...], *,
                 dtype: torch.dtype = torch.float32, threads: int | None = None,
                 onnx: str | os.PathLike | None = None) -> None:
        if not isinstance(module, CoModule):
            raise TypeError(f"the {self.backend} backend needs a continual module, got "
                            f"{type(module).__name__}")
        check_frame_shape(module, frame_shape, f"the {self.backend} backend")
        param = next(module.parameters(), None)
        if param is not None and param.dtype != dtype:
            raise TypeError(f"the {self.backend} backend steps {dtype} frames and state, the "
                            f"module's parameters are {param.dtype}: convert the module "
                            f"(.to({dtype})) or leave dtype out")
        self.module = module
        self.frame_shape = tuple(int(v) for v in frame_shape)
        self.dtype = dtype
        self._stride = module.temporal.stride
        self.threads = threads
        self.compiled = False
        self.reason: str | None = None
        self._onnx = None if onnx is None else Path(onnx)
        self._tmp = tempfile.TemporaryDirectory() if onnx is None else None
        self._graphs: dict[int, Any] = {}

    def _graph(self, batch: int, tree: Any) -> Any:
        graph = self._graphs.get(batch)
        if graph is None:
            if self._onnx is not None:  # a graph exported before: its batch size only
                path = self._onnx
                manifest = json.loads(path.with_suffix(path.suffix + ".json").read_text())
                if manifest["batch_size"] != batch:
                    raise ValueError(f"{path.name} steps {manifest['batch_size']} streams at "
                                     f"once, got a batch of {batch}")
                graph_frames = tuple(manifest["frame_shape"])
                graph_dtype = str(self.dtype).removeprefix("torch.")
                if graph_frames != self.frame_shape or manifest["dtype"] != graph_dtype:
                    raise ValueError(f"{path.name} steps {manifest['dtype']} frames of shape "
                                     f"{graph_frames}, this step {graph_dtype} frames of shape "
                                     f"{self.frame_shape}")
            else:
                from ..export import export_onnx

                path = Path(self._tmp.name) / f"step_b{batch}.onnx"
                manifest = export_onnx(self.module, path, self.frame_shape, batch_size=batch,
                                       dtype=self.dtype)
            names = [f"state.{n}" for n, _ in tree_leaves(tree)]
            if manifest["inputs"][2:] != names:
                raise ValueError(f"the state does not match the exported graph's manifest "
                                 f"({len(names)} leaves given, the graph takes "
                                 f"{len(manifest['inputs']) - 2})")
            graph = self._graphs[batch] = (self._load(path, manifest), manifest)
        return graph

    def _load(self, path: Path, manifest: dict[str, Any]) -> Any:
        raise NotImplementedError

    def _run(self, session: Any, manifest: dict[str, Any], feeds: list) -> list:
        raise NotImplementedError

    def __call__(self, x: Tensor, state: dict[str, Any]) -> tuple[Tensor, dict[str, Any]]:
        if not isinstance(x, Tensor) or x.device.type != "cpu":
            got = f"a tensor on {x.device}" if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"the {self.backend} backend steps CPU tensors of frames, got {got}")
        _check_frames(self.backend, x, state, self._stride, self.frame_shape, self.dtype)
        tree = state["tree"]
        session, manifest = self._graph(x.shape[0], tree)
        feeds = [_array(x), _array(state["age"]), *(_array(t) for _, t in tree_leaves(tree))]
        y, age, *leaves = self._run(session, manifest, feeds)
        new = tree_unflatten(tree, [torch.from_numpy(v) for v in leaves])
        return torch.from_numpy(y), {**state, "tree": new, "age": torch.from_numpy(age)}


def _array(t: Tensor) -> Any:
    return t.detach().contiguous().numpy()


class OnnxRuntimeStep(_ExportedStep):
    """The exported stride step in an onnxruntime session (CPU provider, no spin-waiting
    intra-op threads)."""

    backend = "onnxruntime"

    def _load(self, path: Path, manifest: dict[str, Any]) -> Any:
        from ..export import OnnxStreamRunner

        return OnnxStreamRunner(path, threads=self.threads, spin=False).session

    def _run(self, session: Any, manifest: dict[str, Any], feeds: list) -> list:
        return session.run(None, dict(zip(manifest["inputs"], feeds, strict=True)))


class OpenVinoStep(_ExportedStep):
    """The exported stride step compiled by OpenVINO for its CPU plugin (float32 inference
    precision: no bf16 down-conversion; one stream, threads not pinned to cores)."""

    backend = "openvino"

    def _load(self, path: Path, manifest: dict[str, Any]) -> Any:
        try:
            import openvino as ov
        except ImportError as err:
            raise ImportError("the openvino backend needs OpenVINO: pip install "
                              "'costream[openvino]'") from err
        # the latency hint and core pinning cost 2-6x per call on small steps (measured)
        config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": "f32", "NUM_STREAMS": 1,
                                  "ENABLE_CPU_PINNING": False}
        if self.threads is not None:
            config["INFERENCE_NUM_THREADS"] = int(self.threads)
        compiled = ov.Core().compile_model(str(path), "CPU", config)
        # a port may carry several names (OpenVINO merges an output's tensor name with the
        # name of the node computing it, e.g. ``addmm_1``), its ``any_name`` any of them
        if not (_named(compiled.inputs, manifest["inputs"])
                and _named(compiled.outputs, manifest["outputs"])):
            raise ValueError(f"{path.name}: OpenVINO's inputs and outputs differ from the "
                             f"manifest's")
        return compiled.create_infer_request()

    def _run(self, request: Any, manifest: dict[str, Any], feeds: list) -> list:
        # inputs in the manifest's order (checked at load), read in place; outputs copied
        # out of the request's buffers, which the next call reuses
        return list(request.infer(feeds, share_inputs=True).values())


def _named(ports: Any, names: list[str]) -> bool:
    """Whether OpenVINO's ``ports`` carry ``names``, in that order."""
    return len(ports) == len(names) and all(n in p.names for p, n in zip(ports, names))


def make_step(module: CoModule, backend: str = "eager", *,
              frame_shape: tuple[int, ...] | None = None, dtype: torch.dtype | None = None,
              threads: int | None = None, force_compile: bool = False,
              onnx: str | os.PathLike | None = None) -> StepFn:
    """A stride step of ``module`` run by ``backend`` (one of :data:`BACKENDS`).

    Args:
        module: the continual module (eval mode where it has dropout or batch norm).
        backend: ``"eager"`` (PyTorch), ``"compiled"`` (:func:`compile_step`, which falls back
            to eager on a CPU unless ``force_compile``), ``"onnxruntime"`` or ``"openvino"``
            (the exported graph; CPU, ``float32`` or the given ``dtype``).
        frame_shape: one frame ``(C, *spatial)``; needed by the exported backends.
        dtype: frames' and state's dtype for the exported backends (default: the module's).
        threads: intra-op threads of the onnxruntime session or OpenVINO model (default:
            the runtime's choice).
        force_compile: passed to :func:`compile_step` as ``force``.
        onnx: for the exported backends, a graph already written by
            :func:`costream.export.export_onnx` (manifest next to it) to run, for its batch
            size; by default the step is exported (to a temporary directory) for each batch
            size met.

    Returns:
        ``step(frames (B, C, stride, *spatial), state) -> (y, state)`` from
        :meth:`CoModule.init_state`, as :meth:`CoModule.step_stride`. Its ``backend``
        attribute names the backend, ``compiled`` whether ``torch.compile`` runs it and
        ``reason`` why a requested compilation did not happen (else ``None``).

    Example:
        >>> import torch, costream as cs
        >>> from costream.runtime import make_step
        >>> net = cs.Conv1d(2, 3, 3)
        >>> step = make_step(net, "eager")
        >>> state = net.init_state(1)
        >>> for t in range(3):
        ...     y, state = step(torch.randn(1, 2, 1), state)
        >>> step.backend, y.shape, bool(net.ready(state))
        ('eager', torch.Size([1, 3]), True)
    """
    if not isinstance(module, CoModule):
        raise TypeError(f"make_step needs a continual module (use costream.continual first), "
                        f"got {type(module).__name__}")
    if backend == "eager":
        return EagerStep(module)
    if backend == "compiled":
        from ._compile import compile_step

        return compile_step(module, force=force_compile)
    if backend in ("onnxruntime", "openvino"):
        if frame_shape is None:
            raise ValueError(f"the {backend} backend needs the frame shape (C, *spatial) to "
                             f"export the step")
        if dtype is None:
            param = next(module.parameters(), None)
            dtype = param.dtype if param is not None else torch.float32
        cls = OnnxRuntimeStep if backend == "onnxruntime" else OpenVinoStep
        return cls(module, frame_shape, dtype=dtype, threads=threads, onnx=onnx)
    raise ValueError(f"unknown step backend {backend!r}; choose one of {', '.join(BACKENDS)}")
