"""The continual module base class: the streaming contract of costream.

Every continual module is a ``torch.nn.Module`` whose ``forward`` on a clip equals the offline
``torch.nn`` computation, and whose core is a pure step function over an explicit state pytree.
The stateful methods (``forward_step``, ``forward_steps``, ``reset_state``) are thin wrappers that
keep that state on the module for convenience.

Timing inside a step is described by two values passed down the module tree:

* ``age``: the index of the current input frame of every stream, counted from the stream's start
  (negative while the input is still warm-up filler). It is ``None`` once every stream is past the
  warm-up of the whole network (fast path), a Python ``int`` when all streams share one age, and an
  ``int64`` tensor of shape ``(batch,)`` when streams are at different ages (traceable path).
* ``phase``: a Python ``int`` congruent to the frame index modulo the remaining temporal stride.
  Streams in one batch must share it, so whether a strided module emits is decided statically.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ._mode import current_call_mode
from ._temporal import Temporal
from ._tree import State, tree_check, tree_map, tree_where

Age = None | int | Tensor


def advance(age: Age, phase: int, delay: int, stride: int) -> tuple[Age, int]:
    """``(age, phase)`` of the output a module emits at an input with ``(age, phase)``."""
    q = (phase - delay) // stride
    if age is None:
        return None, q
    if isinstance(age, int):
        a = (age - delay) // stride
        return a, a
    a = age - delay if delay else age
    if stride != 1:
        a = torch.div(a, stride, rounding_mode="floor")
    return a, q


def emits(phase: int, delay: int, stride: int) -> bool:
    """Whether a module with ``delay`` and ``stride`` emits at an input of ``phase``."""
    return stride == 1 or (phase - delay) % stride == 0


def chunk_emissions(length: int, phase: int, delay: int, stride: int) -> tuple[int, int]:
    """First emitting offset and number of outputs for ``length`` input frames from ``phase``."""
    first = (delay - phase) % stride
    return first, max(0, (length - first + stride - 1) // stride)


def crop_warm_up(y: Tensor, age: Age, phase: int) -> tuple[Tensor | None, Age, int]:
    """A chunk's outputs ``y`` (time at dim 2) without those still in the warm-up.

    ``(age, phase)`` is the chunk's first output as :func:`advance` gives it; a known negative
    age means its first ``-age`` outputs are not due yet. Returns ``(y, age, phase)``, with
    ``y`` ``None`` (and ``age`` ``None``) when no output is left.
    """
    if not isinstance(age, int) or age >= 0:
        return y, age, phase
    y = y[:, :, -age:]
    if y.shape[2] == 0:
        return None, None, 0
    return y, 0, 0


def shift(age: Age, phase: int, n: int) -> tuple[Age, int]:
    """``(age, phase)`` ``n`` frames later."""
    if age is None:
        return None, phase + n
    return age + n, phase + n


class _Stream:
    """Bookkeeping of the stateful wrappers (never part of the pure step)."""

    __slots__ = ("age", "delay", "device", "dtype", "frame_shape", "max_age", "min_age",
                 "pending", "phase", "shape", "tree", "uniform")

    def __init__(self, tree: State, age: Tensor, phase: int, shape: tuple, delay: int) -> None:
        self.tree = tree
        self.age = age
        self.pending = 0
        self.phase = phase
        self.shape = shape
        self.frame_shape = None if shape is None else tuple(shape[1:])
        self.dtype = age.dtype
        self.device = age.device
        self.delay = delay
        self.min_age = int(age.min()) if age.numel() else 0
        self.max_age = int(age.max()) if age.numel() else 0
        self.uniform = bool((age == age[0]).all()) if age.numel() else True

    def ages(self) -> Tensor:
        if self.pending:
            self.age = self.age + self.pending
            self.pending = 0
        return self.age

    def mode_age(self) -> Age:
        if self.min_age > self.delay:  # every module has seen each stream's first frame
            return None
        if self.uniform:
            return self.min_age
        return self.ages()


class _TemporalAttr:
    """A read-only view of ``module.temporal.<name>``.

    It is a non-data descriptor: layers that subclass ``torch.nn`` layers keep their own
    ``stride`` / ``padding`` tuples (used by torch's ``forward``), and the temporal values stay
    available as ``module.temporal.stride`` etc.
    """

    def __init__(self, name: str, doc: str) -> None:
        self.name = name
        self.__doc__ = doc

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        if obj is None:
            return self
        return getattr(obj.temporal, self.name)


class CoModule(nn.Module):
    """Base class of continual modules.

    Subclasses implement ``_temporal``, ``_init``, ``_step`` and ``_clip``; they may override
    ``_steps`` (many frames at once) and ``_flush`` (end padding) where they can do better than
    the default frame loop (see ``docs/internals.md``).

    Example:
        >>> import torch, costream as cs
        >>> net = cs.continual(torch.nn.Conv1d(2, 2, 3))
        >>> isinstance(net, cs.CoModule), net.delay
        (True, 2)
        >>> [net.forward_step(torch.randn(1, 2)) is None for _ in range(3)]
        [True, True, False]
    """

    _stream: _Stream | None = None
    call_mode: str = "forward"

    # ------------------------------------------------------------------ to implement
    def _temporal(self) -> Temporal:
        return Temporal()

    def _init(
        self, batch: int, shape: Any, device: torch.device, dtype: torch.dtype
    ) -> tuple[State, Any]:
        """Fresh state for ``batch`` streams of input frames ``shape`` (without batch dim),
        and the output frame shape."""
        return None, shape

    def _step(self, x: Any, state: State, age: Age, phase: int) -> tuple[Any, State, Age, int]:
        raise NotImplementedError

    def _clip(self, x: Any) -> Any:
        raise NotImplementedError

    def _steps(self, x: Tensor, state: State, age: Age, phase: int) -> tuple[Any, State, Age, int]:
        """Step ``x`` of shape ``(B, C, T, ...)``; return the emitted outputs stacked on dim 2."""
        outs: list[Tensor] = []
        out_age: Age = 0
        out_phase = 0
        for t in range(x.shape[2]):
            a, p = shift(age, phase, t)
            y, state, ya, yp = self._step(x[:, :, t], state, a, p)
            if y is not None:
                if not outs:
                    out_age, out_phase = ya, yp
                outs.append(y)
        if not outs:
            return None, state, None, 0
        return stack_frames(outs), state, out_age, out_phase

    def _flush(self, state: State, age: Age, phase: int) -> tuple[Any, State, Age, int]:
        """Feed the end padding; return the outputs it makes due (stacked on dim 2)."""
        pad = self.temporal.end_padding
        if pad <= 0:
            return None, state, None, 0
        return self._steps(self._end_frames(state, pad), state, age, phase)

    def _end_frames(self, state: State, n: int) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} has end padding but no _end_frames")

    def _prepare(self) -> None:
        """Recompute cached static plans (called by ``init_state``)."""

    def _input_spec(self) -> tuple[int | None, int | None]:
        """``(frame_ndim, channels)`` expected of one input frame, where known."""
        return None, None

    # ------------------------------------------------------------------ temporal properties
    @property
    def temporal(self) -> Temporal:
        """The module's temporal geometry (derived, never hand-entered in containers)."""
        return self._temporal()

    receptive_field = _TemporalAttr("receptive_field",
                                    "Number of input frames one output depends on.")
    stride = _TemporalAttr("stride", "Input frames per output frame (temporal stride).")
    padding = _TemporalAttr("padding", "Frames of start padding (negative: frames cropped).")
    delay = _TemporalAttr("delay", "Steps before the first output is emitted.")

    # ------------------------------------------------------------------ explicit state
    def init_state(
        self,
        batch_size: int,
        frame_shape: tuple[int, ...] | None = None,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> dict[str, Any]:
        """A fresh state for ``batch_size`` independent streams of frames ``(C, *spatial)``.

        ``frame_shape`` may be left out when frames have no spatial dimensions. The state is a
        dict: ``tree`` (the state pytree, batch first in every tensor), ``age`` (``int64``
        frames seen per stream), ``phase`` (frames seen modulo ``stride``) and ``frame_shape``.

        Example:
            >>> import torch, costream as cs
            >>> conv = cs.Conv3d(3, 8, kernel_size=3, padding=1)
            >>> state = conv.init_state(2, (3, 16, 16))
            >>> frames = state["tree"]["frames"]  # the last k - 1 input frames, one by one
            >>> len(frames), tuple(frames[0].shape)
            (2, (2, 3, 16, 16))
        """
        dev, dt = self._default_device_dtype(device, dtype)
        if frame_shape is None:
            ndim, channels = self._input_spec()
            if ndim != 2 or channels is None:
                raise ValueError(
                    f"{type(self).__name__}.init_state needs frame_shape=(C, *spatial)")
            frame_shape = (channels,)
        for m in self.modules():
            if isinstance(m, CoModule):
                m._prepare()
        tree, _ = self._init(batch_size, _as_shape(frame_shape), dev, dt)
        return {"tree": tree, "age": torch.zeros(batch_size, dtype=torch.long, device=dev),
                "phase": 0, "frame_shape": _as_shape(frame_shape),
                "dtype": str(dt).removeprefix("torch.")}

    def step(self, x: Any, state: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        """Pure step: one input frame and a state in, the due output (or ``None``) and state out.

        Streams may be at different ages; the output rows of streams younger than ``delay``
        frames hold unspecified values (see :meth:`ready`). The function has no data-dependent
        Python branches, so it can be compiled with ``torch.compile(fullgraph=True)``.
        """
        tree, age, phase = state["tree"], state["age"], state["phase"]
        y, tree, _, _ = self._step(x, tree, age, phase)
        return y, {"tree": tree, "age": age + 1, "phase": (phase + 1) % self.temporal.stride}

    def step_stride(self, x: Any, state: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        """Pure step over ``stride`` frames ``(B, C, stride, ...)``: exactly one output frame.

        The state must be at phase 0 (as :meth:`init_state` makes it). Because every call
        emits one output, the function has no conditional outputs: this is the unit that
        :mod:`costream.export` exports and :mod:`costream.runtime` compiles.

        Example:
            >>> import torch, costream as cs
            >>> net = cs.Conv1d(2, 3, 3, padding=1, stride=2)
            >>> state = net.init_state(1)
            >>> y, state = net.step_stride(torch.randn(1, 2, 2), state)
            >>> y.shape, state["phase"]
            (torch.Size([1, 3]), 0)
        """
        if state["phase"] != 0:
            raise ValueError("step_stride needs a state at phase 0")
        tree, age = state["tree"], state["age"]
        out = None
        clips = x if isinstance(x, tuple) else (x,)
        for i in range(self.temporal.stride):
            frame = tuple(c[:, :, i] for c in clips) if isinstance(x, tuple) else x[:, :, i]
            y, tree, _, _ = self._step(frame, tree, age + i, i)
            if y is not None:
                out = y
        return out, {**state, "tree": tree, "age": age + self.temporal.stride}

    def ready(self, state: dict[str, Any] | None = None) -> Tensor:
        """Per stream: whether the output of the last step was due (not warm-up filler)."""
        if state is None:
            if self._stream is None:
                raise RuntimeError("no stream is running; step the module first")
            age = self._stream.ages()
        else:
            age = state["age"]
        return age > self.temporal.delay

    # ------------------------------------------------------------------ stateful wrappers
    def forward_step(self, x: Any) -> Any:
        """Process one frame ``(B, C, *spatial)``; return the output that became due, or ``None``.

        Stream under ``torch.inference_mode()`` (or ``no_grad``) for deployment: with autograd
        recording, the state keeps the graph of every past step (as backpropagation through
        time needs) and grows with the stream.

        Example:
            >>> import torch, costream as cs
            >>> conv = cs.Conv1d(2, 4, kernel_size=3, padding=1)
            >>> [y is None for y in (conv.forward_step(torch.randn(1, 2)) for _ in range(3))]
            [True, False, False]
        """
        s = self._stream
        if s is None:
            s = self._start(x)
        elif isinstance(x, Tensor) and (
            x.shape != s.shape or x.dtype != s.dtype or x.device != s.device
        ):
            self._bad_frame(x, s)
        y, s.tree, _, _ = self._step(x, s.tree, s.mode_age(), s.phase)
        if s.max_age < s.delay:  # no stream has reached its first output yet
            y = None
        s.pending += 1
        s.min_age += 1
        s.max_age += 1
        s.phase = (s.phase + 1) % self._root_stride
        return y

    def forward_steps(self, x: Tensor, pad_end: bool = False) -> Tensor | None:
        """Process a clip ``(B, C, T, *spatial)`` frame by frame; return the due outputs.

        With ``pad_end=True`` the end padding is fed after the clip, so from a fresh state the
        result equals ``forward(x)``; the stream is then finished and the state reset.

        Example:
            >>> import torch, costream as cs
            >>> conv = cs.Conv1d(2, 4, kernel_size=3, padding=1)
            >>> x = torch.randn(1, 2, 8)
            >>> torch.allclose(conv.forward_steps(x, pad_end=True), conv(x))
            True
        """
        clips = x if isinstance(x, tuple) else (x,)
        if not all(isinstance(c, Tensor) and c.dim() >= 3 for c in clips):
            raise ValueError(f"forward_steps expects a clip (B, C, T, ...), got {_describe(x)}")
        frame = tuple(c.select(2, 0) if c.shape[2] else c.sum(2) for c in clips)
        frame = frame if isinstance(x, tuple) else frame[0]
        s = self._stream
        if s is None:
            s = self._start(frame)
        elif isinstance(frame, Tensor) and (
            frame.shape != s.shape or x.dtype != s.dtype or x.device != s.device
        ):
            self._bad_frame(frame, s)
        outs: list[Any] = []
        t = clips[0].shape[2]
        age = s.mode_age()
        if age is not None and not isinstance(age, int):
            for i in range(t):
                y = self.forward_step(tuple(c[:, :, i] for c in clips) if isinstance(x, tuple)
                                      else x[:, :, i])
                if y is not None:
                    outs.append(_unsqueeze(y))
        else:
            y, s.tree, _, _ = self._steps(x, s.tree, age, s.phase)
            if y is not None:
                outs.append(y)
            s.pending += t
            s.min_age += t
            s.max_age += t
            s.phase = (s.phase + t) % self._root_stride
        if pad_end:
            y, _, _, _ = self._flush(s.tree, s.mode_age(), s.phase)
            if y is not None:
                outs.append(y)
            self._stream = None
        if not outs:
            return None
        if len(outs) == 1:
            return outs[0]
        if isinstance(outs[0], tuple):
            return tuple(torch.cat([o[i] for o in outs], 2) for i in range(len(outs[0])))
        return torch.cat(outs, dim=2)

    def reset_state(self, mask: Tensor | None = None) -> None:
        """Restart every stream (``mask=None``) or those where ``mask`` (``(batch,)``) is true.

        A restarted stream behaves as if it had just been created; the other streams continue.
        """
        s = self._stream
        if mask is None or s is None:
            self._stream = None
            return
        mask = torch.as_tensor(mask, device=s.device)
        batch = s.age.shape[0]
        if mask.shape != (batch,) or mask.dtype != torch.bool:
            raise ValueError(f"reset mask must be a bool tensor of shape ({batch},), "
                             f"got {mask.dtype} {tuple(mask.shape)}")
        if bool(mask.all()):
            self._stream = None
            return
        if s.phase != 0:
            raise ValueError(
                f"this module has temporal stride {self._root_stride}: streams sharing a batch "
                f"can only be reset at phase 0 (every {self._root_stride} steps); current phase "
                f"{s.phase}"
            )
        fresh, _ = self._init(s.age.shape[0], s.frame_shape, s.device, s.dtype)
        s.tree = tree_where(mask, fresh, s.tree)
        s.age = torch.where(mask, torch.zeros_like(s.ages()), s.ages())
        if bool(mask.any()):
            s.min_age = 0
            s.uniform = False

    def get_state(self) -> dict[str, Any] | None:
        """The running streams' state (a detached copy), e.g. to save with ``torch.save``."""
        s = self._stream
        if s is None:
            return None
        copy = tree_map(lambda t: t.detach().clone(), s.tree)
        return {"tree": copy, "age": s.ages().clone(), "phase": s.phase,
                "frame_shape": s.frame_shape, "dtype": str(s.dtype).removeprefix("torch.")}

    def set_state(self, state: dict[str, Any]) -> None:
        """Resume streams from :meth:`get_state` (or :meth:`init_state`) output.

        The state is checked against this module first; nothing is applied if it does not match.
        """
        if not isinstance(state, dict) or {"tree", "age", "phase"} - set(state):
            raise ValueError("a stream state is a dict with keys 'tree', 'age' and 'phase'")
        age = state["age"]
        if not isinstance(age, Tensor) or age.dim() != 1 or age.dtype != torch.long:
            raise ValueError("state['age'] must be an int64 tensor of shape (batch,)")
        phase = int(state["phase"])
        if not 0 <= phase < self.temporal.stride:
            raise ValueError(f"state['phase'] must be in [0, {self.temporal.stride}), got {phase}")
        ref_leaf = next((t for t in _leaves(state["tree"]) if t.is_floating_point()), None)
        if isinstance(state.get("dtype"), str):
            dtype = getattr(torch, state["dtype"], None)
            if not isinstance(dtype, torch.dtype):
                raise ValueError(f"state['dtype'] is not a torch dtype: {state['dtype']!r}")
        elif ref_leaf is not None:
            dtype = ref_leaf.dtype
        else:
            dtype = self._default_device_dtype(None, None)[1]
        param = next((p for p in self.parameters() if p.is_floating_point()), None)
        if param is not None and param.dtype != dtype:
            raise ValueError(f"the state is {dtype}, this module's parameters are {param.dtype}")
        frame_shape = state.get("frame_shape")
        expected = self.init_state(age.shape[0], frame_shape, device=age.device,
                                   dtype=dtype)["tree"]
        tree_check(expected, state["tree"])
        frame_shape = _as_shape(frame_shape) if frame_shape is not None else None
        shape = _batched(age.shape[0], frame_shape) if frame_shape is not None else None
        s = _Stream(tree_map(lambda t: t.clone(), state["tree"]), age.clone(), phase,
                    shape, self._total_delay())
        s.frame_shape = frame_shape
        s.dtype = dtype
        self._stream = s
        self._root_stride = self.temporal.stride

    # ------------------------------------------------------------------ dispatch
    def forward(self, x: Any) -> Any:
        """Run the active call mode (``forward`` on a clip unless a :func:`call_mode` says else)."""
        mode = current_call_mode() or self.call_mode
        if mode == "forward":
            return self._clip(x)
        if mode == "forward_step":
            return self.forward_step(x)
        return self.forward_steps(x)

    # ------------------------------------------------------------------ internals
    def _total_delay(self) -> int:
        return self.temporal.delay

    def _default_device_dtype(
        self, device: torch.device | str | None, dtype: torch.dtype | None
    ) -> tuple[torch.device, torch.dtype]:
        ref = next(self.parameters(), None)
        if ref is None:
            ref = next(self.buffers(), None)
        dev = torch.device(device) if device is not None else (
            ref.device if ref is not None else torch.device("cpu"))
        dt = dtype or (ref.dtype if ref is not None and ref.is_floating_point()
                       else torch.get_default_dtype())
        return dev, dt

    def _start(self, x: Any) -> _Stream:
        if isinstance(x, tuple) and x and all(isinstance(v, Tensor) for v in x):
            ref = x[0]
            state = self.init_state(ref.shape[0], tuple(tuple(v.shape[1:]) for v in x),
                                    device=ref.device, dtype=ref.dtype)
            s = _Stream(state["tree"], state["age"], 0, None, self._total_delay())
            s.dtype, s.shape = ref.dtype, (ref.shape[0],)
            s.frame_shape = state["frame_shape"]
            self._root_stride = self.temporal.stride
            self._stream = s
            return s
        if not isinstance(x, Tensor):
            raise TypeError(f"{type(self).__name__} expects a tensor frame, got {_describe(x)}")
        ndim, channels = self._input_spec()
        if ndim is not None and x.dim() != ndim:
            dims = ("B", "C", "H", "W", "D")[: max(ndim, 2)]
            raise ValueError(
                f"{type(self).__name__}.forward_step expects one frame of shape "
                f"({', '.join(dims[:ndim])}) ({ndim} dims), got shape {tuple(x.shape)}; "
                f"clips (B, C, T, ...) go to forward or forward_steps"
            )
        if channels is not None and (x.dim() < 2 or x.shape[1] != channels):
            raise ValueError(
                f"{type(self).__name__} expects {channels} input channels (dim 1), "
                f"got shape {tuple(x.shape)}"
            )
        pdev, pdt = self._default_device_dtype(None, None)
        if next(self.parameters(), None) is not None:
            if x.dtype != pdt:
                raise TypeError(f"input dtype {x.dtype} does not match the parameters' {pdt}")
            if x.device != pdev:
                raise ValueError(f"input on {x.device}, parameters on {pdev}")
        state = self.init_state(x.shape[0], tuple(x.shape[1:]), device=x.device, dtype=x.dtype)
        s = _Stream(state["tree"], state["age"], 0, tuple(x.shape), self._total_delay())
        s.dtype = x.dtype
        self._root_stride = self.temporal.stride
        self._stream = s
        return s

    def _bad_frame(self, x: Tensor, s: _Stream) -> None:
        if s.shape is None:  # restored state without a recorded frame shape: adopt this one
            s.shape = tuple(x.shape)
            s.frame_shape = tuple(x.shape[1:])
            if x.dtype == s.dtype and x.device == s.device:
                return
        if x.dtype != s.dtype:
            raise TypeError(f"frame dtype {x.dtype} differs from the stream's {s.dtype}")
        if x.device != s.device:
            raise ValueError(f"frame on {x.device}, stream state on {s.device}")
        if x.dim() == len(s.shape) and x.shape[0] != s.shape[0]:
            raise ValueError(
                f"batch size changed from {s.shape[0]} to {x.shape[0]} mid-stream; "
                f"call reset_state() first to start new streams"
            )
        raise ValueError(f"frame shape {tuple(x.shape)} differs from the stream's {s.shape}")

    _root_stride: int = 1


def _as_shape(shape: Any) -> Any:
    """Normalise a frame shape (or a tuple of frame shapes for multi-input modules)."""
    if isinstance(shape, (tuple, list)) and shape and isinstance(shape[0], (tuple, list)):
        return tuple(_as_shape(s) for s in shape)
    return tuple(int(v) for v in shape)


def _frame_shape(batched: tuple) -> tuple:
    return tuple(batched[1:])


def _batched(batch: int, frame_shape: Any) -> tuple:
    return (batch, *frame_shape)


def _unsqueeze(y: Any) -> Any:
    return tuple(v.unsqueeze(2) for v in y) if isinstance(y, tuple) else y.unsqueeze(2)


def stack_frames(frames: list[Tensor]) -> Tensor:
    """Stack per-frame outputs ``(B, C, ...)`` into a clip ``(B, C, T, ...)``."""
    return torch.stack(frames, dim=2)


def _leaves(tree: State):
    from ._tree import tree_leaves

    return (t for _, t in tree_leaves(tree))


def _describe(x: Any) -> str:
    if isinstance(x, Tensor):
        return f"a tensor of shape {tuple(x.shape)}"
    return type(x).__name__
