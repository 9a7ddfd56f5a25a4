"""A multi-stream engine: many independent streams stepped together in one batch.

A fixed pool of state slots lives on one device. Streams open, close and reset at any time;
one :meth:`StreamEngine.step` call steps every stream that has a new frame, batched. Streams
at different positions share a batch; with a temporally strided network they are grouped by
phase (frame count modulo the stride), one batched call per group. Once every stream of a call
is past the network's warm-up, the layers run their fast paths (as ``forward_step`` does).

With ``max_batch`` the slots are stored and stepped in blocks of at most that many streams:
for networks over large frames (video) a smaller batch keeps a call's activations in the CPU
caches. A call that steps a whole block uses its state as it is (no gather and scatter).
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ..core._module import CoModule
from ..core._tree import State, tree_index, tree_index_copy, tree_map


class StreamEngine:
    """Step up to ``capacity`` independent streams of one continual module, batched.

    Args:
        module: the continual module (its own stateful stream is not touched).
        capacity: number of state slots.
        frame_shape: shape of one input frame without the batch dimension, ``(C, *spatial)``.
        device, dtype: where and in which precision the state lives (default: the module's;
            a module with parameters needs its own). Frames must match them.
        max_batch: streams per batched call; ``None``: all of them in one call; ``"auto"``
            (default): as many as keep the largest activation of a call under 32 MiB (see
            ``costream.runtime._blocks``), evenly spread (one block for small networks).
            Slots ``[k * max_batch, (k + 1) * max_batch)`` form block ``k``.
        backend: what runs the batched step: ``"eager"`` (default), ``"compiled"``,
            ``"onnxruntime"`` or ``"openvino"`` (see :func:`costream.runtime.make_step`;
            the others step networks of temporal stride 1).

    Example:
        >>> import torch, costream as cs
        >>> from costream.runtime import StreamEngine
        >>> net = cs.Conv1d(2, 3, 3)
        >>> engine = StreamEngine(net, capacity=4, frame_shape=(2,))
        >>> a, b = engine.open(), engine.open()
        >>> for t in range(3):
        ...     out = engine.step({a: torch.randn(2), b: torch.randn(2)})
        >>> out[a].shape, engine.ready(b)
        (torch.Size([3]), True)
    """

    def __init__(self, module: CoModule, capacity: int, frame_shape: tuple[int, ...], *,
                 device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None, max_batch: int | str | None = "auto",
                 backend: str = "eager") -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        from ._backends import BACKENDS, check_frame_shape

        if backend not in BACKENDS:
            raise ValueError(f"unknown step backend {backend!r}; choose one of "
                             f"{', '.join(BACKENDS)}")
        check_frame_shape(module, frame_shape, "StreamEngine")
        if max_batch == "auto":
            from ._blocks import auto_max_batch

            max_batch = auto_max_batch(module, int(capacity), tuple(frame_shape), device, dtype)
        elif max_batch is not None and (not isinstance(max_batch, numbers.Integral)
                                        or isinstance(max_batch, bool) or max_batch < 1):
            raise ValueError(f"max_batch must be >= 1, None or 'auto', got {max_batch!r}")
        self.module = module
        self.capacity = int(capacity)
        self.frame_shape = tuple(frame_shape)
        self.max_batch = min(int(max_batch or capacity), self.capacity)
        self._blocks: list[State] = []
        for lo in range(0, self.capacity, self.max_batch):
            n = min(self.max_batch, self.capacity - lo)
            state = module.init_state(n, self.frame_shape, device=device, dtype=dtype)
            self._blocks.append(state["tree"])
        self.device = state["age"].device
        ref = next((t for t in _float_leaves(state["tree"])), None)
        self.dtype = ref.dtype if ref is not None else (dtype or torch.get_default_dtype())
        param = next(module.parameters(), None)
        if param is not None and (param.dtype, param.device) != (self.dtype, self.device):
            raise ValueError(f"the engine's state would be {self.dtype} on {self.device}, the "
                             f"module's parameters are {param.dtype} on {param.device}: pass "
                             f"the module's dtype and device (or none)")
        self._fresh: State = module.init_state(1, self.frame_shape, device=self.device,
                                               dtype=self.dtype)["tree"]
        self._age = [0] * self.capacity
        self._active = [False] * self.capacity
        self._stride = module.temporal.stride
        self._delay = module.temporal.delay
        self._warm_up = module._total_delay()
        self.backend = backend
        self._stepper = None if backend == "eager" else self._backend_step(backend)

    # ------------------------------------------------------------------ slots
    def open(self) -> int:
        """Start a new stream in a free slot; return its id."""
        for sid, used in enumerate(self._active):
            if not used:
                self._restart(sid)
                self._active[sid] = True
                return sid
        raise RuntimeError(f"all {self.capacity} stream slots are in use; close one first")

    def close(self, sid: int) -> None:
        """End stream ``sid`` and free its slot."""
        self._check(sid)
        self._active[sid] = False

    def reset(self, sid: int) -> None:
        """Restart stream ``sid`` from a fresh state (same slot)."""
        self._check(sid)
        self._restart(sid)

    @property
    def active(self) -> list[int]:
        """Ids of the open streams."""
        return [i for i, a in enumerate(self._active) if a]

    def ready(self, sid: int) -> bool:
        """Whether stream ``sid`` has produced its first output."""
        self._check(sid)
        return self._age[sid] > self._delay

    def frames_seen(self, sid: int) -> int:
        """Frames stream ``sid`` has received since it (re)started."""
        self._check(sid)
        return self._age[sid]

    # ------------------------------------------------------------------ stepping
    def step(self, frames: Mapping[int, Tensor]) -> dict[int, Tensor | None]:
        """Step the streams in ``frames`` (``{id: frame (C, *spatial)}``), batched.

        Returns ``{id: output}``, the output being ``None`` while the stream warms up or between
        the outputs of a strided network. Frames must have the engine's dtype and device (those
        of the module's parameters); other frames are refused, not cast.
        """
        for sid, f in frames.items():
            self._check(sid)
            self._check_frame(sid, f)
        groups: dict[tuple[int, int], list[int]] = {}
        for sid in sorted(frames):
            key = (sid // self.max_batch, self._age[sid] % self._stride)
            groups.setdefault(key, []).append(sid)
        out: dict[int, Tensor | None] = {}
        for (block, phase), ids in groups.items():
            x = torch.stack([frames[i] for i in ids])
            ages = self._ages(ids)
            tree = self._blocks[block]
            lo = block * self.max_batch
            if len(ids) == min(self.max_batch, self.capacity - lo):  # the whole block: as it is
                y, self._blocks[block] = self._call(x, tree, ids, ages, phase)
            else:
                idx = torch.tensor([i - lo for i in ids], device=self.device)
                y, sub = self._call(x, tree_index(tree, idx), ids, ages, phase)
                tree_index_copy(tree, idx, sub)
            rows = None if y is None else y.unbind(0)  # one call, not one index per stream
            for j, sid in enumerate(ids):
                due = rows is not None and self._age[sid] >= self._delay
                out[sid] = rows[j] if due else None
                self._age[sid] += 1
        return out

    def _call(self, x: Tensor, tree: State, ids: list[int], ages: int | Tensor | None,
              phase: int) -> tuple[Tensor | None, State]:
        """One batched step of streams ``ids`` (state ``tree``) by the engine's backend."""
        if self._stepper is None:
            y, tree, _, _ = self.module._step(x, tree, ages, phase)
            return y, tree
        age = torch.tensor([self._age[i] for i in ids], device=self.device)
        y, state = self._stepper(x.unsqueeze(2), {"tree": tree, "age": age, "phase": 0})
        return y, state["tree"]

    def _backend_step(self, backend: str):
        from ._backends import make_step

        if self._stride != 1:
            raise ValueError(f"the {backend} backend steps networks of temporal stride 1 in "
                             f"the engine (this one has stride {self._stride}); use the "
                             f"eager backend")
        return make_step(self.module, backend, frame_shape=self.frame_shape, dtype=self.dtype)

    def _ages(self, ids: list[int]) -> int | Tensor | None:
        """The ``age`` the module's step gets for streams ``ids`` (see ``costream.core``):
        ``None`` once every one is past the network's warm-up (the layers' fast paths), an
        ``int`` when they share one age, else a tensor of their ages."""
        ages = [self._age[i] for i in ids]
        low = min(ages)
        if low > self._warm_up:
            return None
        if low == max(ages):
            return low
        return torch.tensor(ages, device=self.device)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """The engine's streams: state pytree (all ``capacity`` slots, batch first), per-slot
        frame counts and open slots."""
        tree = tree_map(lambda *ts: torch.cat(ts).detach(), *self._blocks)  # a copy
        return {"tree": tree, "age": list(self._age), "active": list(self._active)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output (checked first; nothing applied on mismatch)."""
        from ..core._tree import tree_check

        template = tree_map(lambda t: t.expand(self.capacity, *t.shape[1:]), self._fresh)
        tree_check(template, state["tree"], "engine state")
        if len(state["age"]) != self.capacity or len(state["active"]) != self.capacity:
            raise ValueError(f"engine state is for {len(state['age'])} slots, this engine has "
                             f"{self.capacity}")
        self._blocks = [
            tree_map(lambda t, lo=lo: t[lo: lo + self.max_batch].to(self.device).clone(),
                     state["tree"])
            for lo in range(0, self.capacity, self.max_batch)]
        self._age = [int(a) for a in state["age"]]
        self._active = [bool(a) for a in state["active"]]

    def _restart(self, sid: int) -> None:
        idx = torch.tensor([sid % self.max_batch], device=self.device)
        tree_index_copy(self._blocks[sid // self.max_batch], idx, self._fresh)
        self._age[sid] = 0

    def _check_frame(self, sid: int, f: Any) -> None:
        """Refuse a frame the module would not take (as ``forward_step`` does): no cast."""
        if not isinstance(f, Tensor):
            raise TypeError(f"stream {sid}: expected a tensor frame, got {type(f).__name__}")
        if tuple(f.shape) != self.frame_shape:
            raise ValueError(f"stream {sid}: frame shape {tuple(f.shape)}, expected "
                             f"{self.frame_shape}")
        if f.dtype != self.dtype:
            raise TypeError(f"stream {sid}: frame dtype {f.dtype} differs from the engine's "
                            f"{self.dtype} (convert frames with .to({self.dtype}))")
        if f.device != self.device:
            raise ValueError(f"stream {sid}: frame on {f.device}, the engine's streams on "
                             f"{self.device}")

    def _check(self, sid: int) -> None:
        if not (0 <= sid < self.capacity) or not self._active[sid]:
            raise KeyError(f"no open stream with id {sid}")


def _float_leaves(tree: State):
    from ..core._tree import tree_leaves

    return (t for _, t in tree_leaves(tree) if t.is_floating_point())
