"""``assert_streaming_equivalent``: the streaming contract as one assertion.

For a continual module and a clip it checks, in order:

1. ``forward(x)`` equals the offline reference (the source module, a callable or a tensor);
   a call without one must say ``self_consistency_only=True``: checks 2-8 only compare the
   module with itself, so a ``forward`` that differs from the source (a branch misaligned by a
   frame, say) passes them;
2. ``forward_steps(x, pad_end=True)`` from a fresh state equals ``forward(x)``;
3. a loop of ``forward_step`` returns ``None`` for exactly the first ``delay`` steps and between
   strided outputs, and the outputs that became due equal the first outputs of ``forward(x)``;
4. ``forward_steps(x)`` in two chunks equals the same outputs;
5. after ``reset_state()`` the stream restarts identically;
6. the pure ``step`` over an explicit state gives the same outputs;
7. streams in one batch are independent: a stream reset mid-batch matches a stream run alone;
8. the state saved mid-stream (``torch.save`` / ``torch.load(weights_only=True)``) resumes in a
   fresh copy of the module bit-identically.
"""

from __future__ import annotations

import copy
import io
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..core._module import CoModule


def tolerances(dtype: torch.dtype) -> dict[str, float]:
    """``rtol``/``atol`` for comparing a stepped and an offline result in ``dtype``.

    Example:
        >>> import torch
        >>> from costream.testing import tolerances
        >>> tolerances(torch.float32)
        {'rtol': 0.0001, 'atol': 1e-05}
    """
    if dtype == torch.float64:
        return {"rtol": 1e-10, "atol": 1e-10}
    if dtype in (torch.float16, torch.bfloat16):
        return {"rtol": 1e-2, "atol": 1e-2}
    return {"rtol": 1e-4, "atol": 1e-5}


def _frame(x: Any, t: int) -> Any:
    return tuple(v[:, :, t] for v in x) if isinstance(x, tuple) else x[:, :, t]


def _chunk(x: Any, a: int, b: int) -> Any:
    return tuple(v[:, :, a:b] for v in x) if isinstance(x, tuple) else x[:, :, a:b]


def _batch(x: Any, idx: Any) -> Any:
    return tuple(v[idx] for v in x) if isinstance(x, tuple) else x[idx]


def _length(x: Any) -> int:
    return (x[0] if isinstance(x, tuple) else x).shape[2]


def _close(actual: Any, expected: Any, what: str, tol: dict[str, float]) -> None:
    if isinstance(expected, tuple):
        for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
            _close(a, e, f"{what}[{i}]", tol)
        return
    if actual is None or tuple(actual.shape) != tuple(expected.shape):
        got = None if actual is None else tuple(actual.shape)
        raise AssertionError(f"{what}: expected shape {tuple(expected.shape)}, got {got}")
    torch.testing.assert_close(actual, expected, msg=lambda m: f"{what}: {m}", **tol)


def _stack(outs: list[Any]) -> Any:
    if isinstance(outs[0], tuple):
        return tuple(torch.stack([o[i] for o in outs], 2) for i in range(len(outs[0])))
    return torch.stack(outs, 2)


def _layout(module: Any) -> tuple[int, bool] | None:
    """``(time_dim, flat)`` of a module whose clips keep time off dim 2, else ``None``."""
    td, flat = getattr(module, "time_dim", 2), getattr(module, "_flat", False)
    return (td, flat) if td != 2 or flat else None


class _LayoutView:
    """A module whose clips keep time at ``time_dim`` (and its reference), seen with clips
    ``(B, C, T, ...)``: frames are the same either way, clips are moved."""

    def __init__(self, module: Any) -> None:
        self.module = module
        self.time_dim, self.flat = _layout(module)
        out = module._nodes[module._output]
        self.out_axis = 2 if out.virtual or not isinstance(out.time_axis, int) else \
            out.time_axis

    @classmethod
    def wrap(cls, module: Any, x: Tensor, reference: Any) -> tuple[Any, Tensor, Any]:
        view = cls(module)
        if callable(reference):
            ref = reference
            reference = lambda c: view._out(ref(view._in(c)))  # noqa: E731
        elif isinstance(reference, Tensor):
            reference = view._out(reference)
        return view, view._to(x), reference

    def _to(self, x: Tensor) -> Tensor:
        return x.unsqueeze(1) if self.flat else x.movedim(self.time_dim, 2)

    def _in(self, c: Tensor) -> Tensor:
        return c.squeeze(1) if self.flat else c.movedim(2, self.time_dim)

    def _out(self, y: Any) -> Any:
        if not isinstance(y, Tensor) or self.out_axis == 2 or y.dim() <= self.out_axis:
            return y
        return y.movedim(self.out_axis, 2)

    def __call__(self, c: Tensor) -> Any:
        return self._out(self.module(self._in(c)))

    def forward_steps(self, c: Tensor, pad_end: bool = False) -> Any:
        return self._out(self.module.forward_steps(self._in(c), pad_end))

    def __deepcopy__(self, memo: dict) -> _LayoutView:
        return _LayoutView(copy.deepcopy(self.module, memo))

    def __getattr__(self, name: str) -> Any:  # stepping, state and geometry as they are
        return getattr(self.module, name)


def _steps_out(module: CoModule, x: Any, t: int) -> list[Any]:
    return [module.forward_step(_frame(x, i)) for i in range(t)]


def assert_streaming_equivalent(
    module: CoModule,
    x: Tensor | tuple[Tensor, ...],
    reference: Callable[[Any], Any] | Tensor | None = None,
    *,
    rtol: float | None = None,
    atol: float | None = None,
    check_batch: bool = True,
    check_state: bool = True,
    self_consistency_only: bool = False,
) -> None:
    """Assert that ``module`` meets the streaming contract on clip ``x`` ``(B, C, T, ...)``.

    Args:
        module: the continual module (its stream state is reset before and after).
        x: a clip, or a tuple of clips for multi-input modules; batch >= 2 for the
            independent-streams check.
        reference: the offline computation ``forward`` must equal (e.g. the source
            ``torch.nn`` module), or its output. Required unless ``self_consistency_only``.
        rtol, atol: tolerances; default per dtype (:func:`tolerances`).
        check_batch: run the independent-streams check (needs batch >= 2).
        check_state: run the save/restore check.
        self_consistency_only: check only that stepping agrees with the module's own
            ``forward`` (for a module with no offline source), with ``reference=None``.

    Raises:
        TypeError: no ``reference`` and not ``self_consistency_only``, or both.

    Example:
        >>> import torch, costream as cs
        >>> from costream.testing import assert_streaming_equivalent
        >>> src = torch.nn.Conv1d(2, 3, 3, padding=1).double()
        >>> assert_streaming_equivalent(cs.continual(src), torch.randn(2, 2, 9).double(), src)
    """
    if reference is None and not self_consistency_only:
        raise TypeError(
            "assert_streaming_equivalent needs the offline reference (the source module, a "
            "callable or its output): without one nothing is compared to the source, and a "
            "module whose forward differs from it passes. Pass reference=None, "
            "self_consistency_only=True to check only the module against itself")
    if reference is not None and self_consistency_only:
        raise TypeError("self_consistency_only=True with a reference: drop one of them")
    if _layout(module) is not None:  # a traced model that keeps time elsewhere (time_dim)
        module, x, reference = _LayoutView.wrap(module, x, reference)
    dtype = (x[0] if isinstance(x, tuple) else x).dtype
    tol = tolerances(dtype)
    if rtol is not None:
        tol["rtol"] = rtol
    if atol is not None:
        tol["atol"] = atol
    t = _length(x)
    geom = module.temporal
    module.reset_state()
    with torch.no_grad():
        offline = module(x)
        if reference is not None:
            expected = reference(x) if callable(reference) else reference
            _close(offline, expected, "forward vs reference", tol)

        _close(module.forward_steps(x, pad_end=True), offline, "forward_steps(pad_end=True)", tol)

        outs = _steps_out(module, x, t)
        due = [i for i in range(t) if i >= geom.delay and (i - geom.delay) % geom.stride == 0]
        got = [i for i, y in enumerate(outs) if y is not None]
        if got != due:
            raise AssertionError(f"forward_step returned outputs at steps {got}, expected {due} "
                                 f"(delay {geom.delay}, stride {geom.stride})")
        stepped = [y for y in outs if y is not None]
        if stepped:
            _close(_stack(stepped), _chunk(offline, 0, len(stepped)), "forward_step loop", tol)
        state_mid = module.get_state()

        module.reset_state()
        half = t // 2
        parts = [module.forward_steps(_chunk(x, 0, half)), module.forward_steps(_chunk(x, half, t))]
        parts = [p for p in parts if p is not None]
        if stepped:
            joined = (tuple(torch.cat([p[i] for p in parts], 2) for i in range(len(parts[0])))
                      if isinstance(parts[0], tuple) else torch.cat(parts, 2))
            _close(joined, _stack(stepped), "forward_steps in two chunks", tol)

        module.reset_state()
        again = _steps_out(module, x, t)
        for i, (a, b) in enumerate(zip(outs, again, strict=True)):
            if (a is None) != (b is None):
                raise AssertionError(f"after reset_state, step {i} output presence differs")
            if a is not None:
                _close(b, a, f"after reset_state, step {i}", tol)
        module.reset_state()

        _check_pure_step(module, x, outs, tol)
        if check_batch and (x[0] if isinstance(x, tuple) else x).shape[0] >= 2:
            _check_independent_streams(module, x, tol)
        if check_state and state_mid is not None:
            _check_resume(module, x, tol)
    module.reset_state()


def _check_pure_step(module: CoModule, x: Any, outs: list[Any], tol: dict[str, float]) -> None:
    first = _frame(x, 0)
    ref = first[0] if isinstance(first, tuple) else first
    frame_shape = (tuple(tuple(v.shape[1:]) for v in first) if isinstance(first, tuple)
                   else tuple(first.shape[1:]))
    state = module.init_state(ref.shape[0], frame_shape, device=ref.device, dtype=ref.dtype)
    for i, expected in enumerate(outs):
        y, state = module.step(_frame(x, i), state)
        if expected is None:
            continue
        if y is None:
            raise AssertionError(f"pure step: no output at step {i}, forward_step had one")
        _close(y, expected, f"pure step, step {i}", tol)


def _check_independent_streams(module: CoModule, x: Any, tol: dict[str, float]) -> None:
    """Stream 1 is restarted mid-clip on stream 0's frames; both must match solo runs."""
    t = _length(x)
    s = module.temporal.stride
    restart = max(s, (t // 3) // s * s)
    solo0 = _steps_out(module, _batch(x, slice(0, 1)), t)
    module.reset_state()
    solo_new = _steps_out(module, _batch(x, slice(0, 1)), t - restart)
    module.reset_state()
    xb = _batch(x, slice(0, 2))
    mixed = []
    for i in range(t):
        if i == restart:
            module.reset_state(torch.tensor([False, True]))
        frame = _frame(xb, i)
        if i >= restart:  # the restarted stream sees stream 0's clip from its start
            src = _frame(_batch(x, slice(0, 1)), i - restart)
            frame = (tuple(torch.cat([f[:1], g], 0) for f, g in zip(frame, src, strict=True))
                     if isinstance(frame, tuple) else torch.cat([frame[:1], src], 0))
        y = module.forward_step(frame)
        ready = module.ready() if y is not None else None
        mixed.append((y, ready))
    module.reset_state()
    for i, (y, ready) in enumerate(mixed):
        a = solo0[i]
        if (a is None) != (y is None):
            raise AssertionError(f"batched streams: step {i} output presence differs from solo run")
        if y is None:
            continue
        _close(_batch(y, slice(0, 1)), a, f"batched stream 0, step {i}", tol)
        if i >= restart and bool(ready[1]):
            b = solo_new[i - restart]
            if b is None:
                raise AssertionError(f"restarted stream ready at step {i} but solo run had none")
            _close(_batch(y, slice(1, 2)), b, f"restarted stream 1, step {i}", tol)
        if i >= restart and not bool(ready[1]) and solo_new[i - restart] is not None:
            raise AssertionError(f"restarted stream not ready at step {i}, solo run was")


def _check_resume(module: CoModule, x: Any, tol: dict[str, float]) -> None:
    t = _length(x)
    cut = max(1, t // 2)
    full = _steps_out(module, x, t)
    module.reset_state()
    _steps_out(module, x, cut)
    buf = io.BytesIO()
    torch.save(module.get_state(), buf)
    module.reset_state()
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    fresh = copy.deepcopy(module)
    fresh.set_state(state)
    rest = [fresh.forward_step(_frame(x, i)) for i in range(cut, t)]
    for i, (a, b) in enumerate(zip(full[cut:], rest, strict=True)):
        if (a is None) != (b is None):
            raise AssertionError(f"resumed stream: step {cut + i} output presence differs")
        if a is not None:
            _close(b, a, f"resumed stream, step {cut + i}", {"rtol": 0.0, "atol": 0.0})
