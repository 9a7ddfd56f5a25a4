"""``costream bench``: cost, speed and exactness of continual networks against their offline run.

For every model, :func:`run_bench`

1. streams a random clip a little longer than the receptive field through ``forward_step``
   and compares the outputs that became due with the offline ``forward`` over the same stream
   (the exactness check, run every time);
2. counts the MACs of the offline network on its clip and of one steady-state step, in the
   ptflops convention of the Co3D and Continual Transformer papers (:class:`PtflopsCounter`);
3. times the offline clip and steady-state steps under ``torch.inference_mode()`` (medians);
4. measures the stream state (bytes of the tensors of ``get_state()["tree"]``).

The offline "clip" is what a sliding-window deployment recomputes for every prediction: the
network's own ``forward`` (the offline computation, identical to the source ``torch.nn`` model)
on the clip it was designed for (a zoo model's native clip length, otherwise its receptive
field).
"""

from __future__ import annotations

import gc
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..testing import tolerances
from ._ptflops import PtflopsCounter
from ._workloads import DEFAULT_MODELS, Workload, resolve_workload

__all__ = ["MAX_WINDOW_MACS", "FrameShapeError", "WorkloadError", "run_bench", "state_bytes"]

#: Window sweeps skip offline windows estimated above this many MACs (minutes on a CPU).
MAX_WINDOW_MACS = 6e10


class WorkloadError(ValueError):
    """A model :func:`run_bench` cannot build (unknown name, module or function, no frame
    shape, a damaged or untrusted file); the message names it."""


class FrameShapeError(WorkloadError):
    """A benchmarked model fails on frames of the shape it was given (the first run of it)."""


# ---------------------------------------------------------------------------- counting
def _clip_macs(net: nn.Module, clip: Tensor) -> int:
    """MACs of ``net(clip)`` (fused attention kernels included, see :class:`PtflopsCounter`)."""
    with torch.inference_mode(), PtflopsCounter() as counter:
        net(clip)
    return counter.total


# ---------------------------------------------------------------------------- timing helpers
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], Any], device: torch.device, n: int, budget_s: float,
           minimum: int = 3) -> list[float]:
    """Seconds per call of ``fn``: ``n`` calls, fewer (at least ``minimum``) past the budget."""
    times: list[float] = []
    start = time.perf_counter()
    for i in range(max(n, 1)):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
        if i + 1 >= minimum and time.perf_counter() - start > budget_s:
            break
    return times


def _tensors(tree: Any) -> Iterable[Tensor]:
    if isinstance(tree, Tensor):
        yield tree
    elif isinstance(tree, dict):
        for v in tree.values():
            yield from _tensors(v)
    elif isinstance(tree, (tuple, list)):
        for v in tree:
            yield from _tensors(v)


def state_bytes(module: nn.Module) -> int:
    """Bytes of the tensors of ``module.get_state()["tree"]`` (0 without a running stream).

    Example:
        >>> import torch, costream as cs
        >>> from costream.bench import state_bytes
        >>> conv = cs.Conv1d(2, 4, 3)
        >>> _ = conv.forward_step(torch.randn(1, 2))
        >>> state_bytes(conv)  # 2 partial sums of 4 float32 channels
        32
    """
    state = module.get_state()
    if state is None:
        return 0
    return sum(t.numel() * t.element_size() for t in _tensors(state["tree"]))


def _cpu_jiffies() -> tuple[int, int] | None:
    """(busy jiffies of the whole machine, jiffies of this process), or None off Linux."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        with open("/proc/self/stat") as f:
            own = f.read().rsplit(")", 1)[1].split()
    except (OSError, ValueError, IndexError):
        return None
    busy = sum(fields[:8]) - fields[3] - fields[4]  # all but idle and iowait
    return busy, int(own[11]) + int(own[12])  # utime + stime


def _other_load(start: tuple[int, int] | None, seconds: float) -> float | None:
    """CPUs kept busy by other processes since ``start`` (a :func:`_cpu_jiffies` reading)."""
    end = _cpu_jiffies()
    if start is None or end is None or seconds <= 0:
        return None
    hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    return max(0.0, ((end[0] - start[0]) - (end[1] - start[1])) / hz / seconds)


# ---------------------------------------------------------------------------- one model
def _step_stream(net: nn.Module, x: Tensor) -> Tensor | None:
    outs = [net.forward_step(x[:, :, t]) for t in range(x.shape[2])]
    due = [y for y in outs if y is not None]
    return torch.stack(due, dim=2) if due else None


def _exactness(net: nn.Module, x: Tensor) -> dict[str, Any]:
    """Step ``x`` from a fresh state and compare with ``forward(x)``; leaves the stream running."""
    net.reset_state()
    offline = net(x)
    stepped = _step_stream(net, x)
    if stepped is None:
        raise RuntimeError(f"no output became due in {x.shape[2]} frames")
    expected = offline[:, :, : stepped.shape[2]]
    if expected.shape != stepped.shape:
        raise AssertionError(f"stepped outputs {tuple(stepped.shape)} do not match the offline "
                             f"outputs {tuple(expected.shape)}")
    tol = tolerances(x.dtype)
    diff = (stepped - expected).abs()
    exact = bool((diff <= tol["atol"] + tol["rtol"] * expected.abs()).all())
    return {"max_abs_diff": float(diff.max()), "max_abs_output": float(expected.abs().max()),
            "exact": exact, "rtol": tol["rtol"], "atol": tol["atol"],
            "outputs_compared": int(stepped.shape[2]), "stream_frames": int(x.shape[2])}


def _step_latency(net: nn.Module, frames: Sequence[Tensor], device: torch.device, steps: int,
                  budget_s: float) -> float:
    """Median milliseconds per step over blocks of ``stride`` steady-state steps."""
    stride = net.temporal.stride
    i = 0

    def block() -> None:
        nonlocal i
        for _ in range(stride):
            net.forward_step(frames[i % len(frames)])
            i += 1

    times = _timed(block, device, max(1, steps // stride), budget_s, minimum=min(5, steps))
    return statistics.median(times) / stride * 1e3


def _warm_stream(net: nn.Module, clip_shape: tuple[int, ...],
                 device: torch.device) -> list[Tensor]:
    """Start a stream of clips ``clip_shape`` past the warm-up of ``net``; return frames to keep
    stepping with."""
    net.reset_state()
    frames = net.delay + 2 * net.temporal.stride
    clip = torch.randn(*clip_shape[:2], frames, *clip_shape[3:], device=device)
    net.forward_steps(clip)
    return [clip[:, :, t] for t in range(clip.shape[2])]


def _backend_latency(net: nn.Module, w: Workload, x: Tensor, backend: str, steps: int,
                     budget_s: float) -> dict[str, Any]:
    """Step ``x`` through ``backend`` (see :func:`costream.runtime.make_step`) from a fresh
    state, compare its due outputs with ``net(x)``, then time steady-state stride steps:
    ``step_ms`` (median milliseconds per frame), ``backend_max_abs_diff``, ``backend_exact``."""
    from ..runtime import make_step

    step = make_step(net, backend, frame_shape=w.frame_shape, dtype=x.dtype)
    stride, delay = net.temporal.stride, net.temporal.delay
    state = net.init_state(x.shape[0], w.frame_shape, device=x.device, dtype=x.dtype)
    outs = []
    for t in range(0, x.shape[2] - stride + 1, stride):
        y, state = step(x[:, :, t: t + stride], state)
        if int(state["age"].min()) - stride + (delay % stride) >= delay:  # due (not filler)
            outs.append(y)
    got = torch.stack(outs, 2)
    want = net(x)[:, :, : got.shape[2]]
    tol = tolerances(x.dtype)
    diff = (got - want).abs()
    chunks = [x[:, :, t: t + stride] for t in range(0, x.shape[2] - stride + 1, stride)]
    i = 0

    def block() -> None:
        nonlocal i, state
        _, state = step(chunks[i % len(chunks)], state)
        i += 1

    times = _timed(block, x.device, max(1, steps // stride), budget_s, minimum=min(5, steps))
    return {"step_ms": statistics.median(times) / stride * 1e3,
            "backend_max_abs_diff": float(diff.max()),
            "backend_exact": bool((diff <= tol["atol"] + tol["rtol"] * want.abs()).all()),
            "compiled": bool(getattr(step, "compiled", False))}


def _measure(w: Workload, batch_size: int, steps: int, device: torch.device,
             window_factors: Sequence[int], stage: Callable[[str], None],
             backend: str = "eager") -> dict[str, Any]:
    net = w.net.to(device).eval()
    geom = net.temporal
    stride = geom.stride
    row: dict[str, Any] = {
        "model": w.name, "description": w.description,
        "params": sum(p.numel() for p in net.parameters()),
        "frame_shape": list(w.frame_shape), "clip_frames": w.clip_length,
        "receptive_field": geom.receptive_field, "delay": geom.delay, "stride": stride,
        "padding": geom.padding, "batch_size": batch_size,
    }
    stream_len = geom.receptive_field + 4 * stride
    stream_len += (-stream_len) % stride
    x = torch.randn(w.clip_shape(batch_size, stream_len), device=device)

    stage(f"exactness over {stream_len} frames")
    try:
        row.update(_exactness(net, x))
    except (RuntimeError, ValueError) as err:  # the first time the model sees the frames
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        shape = ",".join(str(v) for v in w.frame_shape)
        raise FrameShapeError(f"fails on frames of shape {shape}: {first}") from err
    frames = [x[:, :, t] for t in range(stream_len)]

    stage("MACs")
    with PtflopsCounter() as counter:
        for t in range(stride):
            net.forward_step(frames[t])
    row["macs_step"] = counter.total / stride
    row["state_bytes"] = state_bytes(net)

    stage(f"{steps} steps")
    row["backend"] = backend
    if backend == "eager":
        row["step_ms"] = _step_latency(net, frames, device, steps, budget_s=3.0)
    else:
        row.update(_backend_latency(net, w, x, backend, steps, budget_s=3.0))
        row["exact"] = row["exact"] and row["backend_exact"]
    net.reset_state()

    stage("offline clip")
    clip = torch.randn(w.clip_shape(batch_size), device=device)
    row["macs_clip"] = _clip_macs(net, clip)
    row["clip_ms"] = statistics.median(_timed(lambda: net(clip), device, 5, 3.0)) * 1e3
    row["mac_reduction"] = row["macs_clip"] / row["macs_step"] if row["macs_step"] else math.inf
    row["speedup"] = row["clip_ms"] / row["step_ms"]

    row["windows"] = []
    for f in window_factors:
        frames_w = w.clip_length * int(f)
        if f == 1:
            row["windows"].append({"frames": frames_w, "clip_ms": row["clip_ms"],
                                   "step_ms": row["step_ms"]})
            continue
        if w.resize is None or row["macs_clip"] * f > MAX_WINDOW_MACS:
            continue
        stage(f"window of {frames_w} frames")
        with torch.inference_mode(False):
            other, length = w.resize(frames_w)
        other = other.to(device).eval()
        clip_w = torch.randn(w.clip_shape(batch_size, length), device=device)
        clip_ms = statistics.median(_timed(lambda m=other, c=clip_w: m(c), device, 3, 3.0,
                                           minimum=2)) * 1e3
        step_ms = row["step_ms"]
        if w.step_depends_on_window:
            warm = _warm_stream(other, clip_w.shape, device)
            step_ms = _step_latency(other, warm, device, steps, budget_s=2.0)
            other.reset_state()
        row["windows"].append({"frames": length, "clip_ms": clip_ms, "step_ms": step_ms})
        del other, clip_w
    return row


# ---------------------------------------------------------------------------- the benchmark
def run_bench(
    models: Sequence[str | Workload] | None = None,
    batch_size: int = 1,
    threads: int | None = None,
    device: str | torch.device = "cpu",
    steps: int = 30,
    progress: bool = True,
    *,
    frame_shape: tuple[int, ...] | None = None,
    window_factors: Sequence[int] = (),
    seed: int = 0,
    temporal_window: int | None = None,
    trust: bool = False,
    backend: str = "eager",
) -> list[dict[str, Any]]:
    """Benchmark continual models against their offline computation; one result per model.

    Args:
        models: names (built-in workloads ``"tcn"``, ``"transformer"``, continual zoo models
            such as ``"cox3d_s"``, ``package.module:function``, files written by ``costream
            convert``) or :class:`Workload` objects; default :data:`DEFAULT_MODELS`.
        batch_size: independent streams stepped together.
        threads: ``torch.set_num_threads`` for the run (restored afterwards); default: torch's.
        device: where to run (``"cpu"``, ``"cuda"``).
        steps: steady-state steps timed per model (fewer once 3 s are spent, at least 5).
        progress: show a progress bar on stderr (needs ``tqdm``; silently off without it).
        frame_shape: input frame shape ``(C, *spatial)`` for ``module:function`` models.
        window_factors: also time the offline network on windows this many times its clip
            (same weights; models that can be resized, windows up to an estimated
            ``MAX_WINDOW_MACS`` = 6e10 MACs), e.g. ``(1, 2, 4)`` for plots.
        seed: seed of the random weights and inputs.
        temporal_window: tokens attended over online, for ``module:function`` models with
            attention (passed to :func:`costream.continual`).
        trust: run the builder that a ``costream convert`` file names (see
            :func:`load_converted`); without it such files are refused.
        backend: what runs the timed steps (:data:`costream.runtime.BACKENDS`): ``"eager"``
            ``forward_step`` (default), or the stride step of
            :func:`costream.runtime.make_step`, whose stepped outputs are also compared with
            the offline run (``backend_max_abs_diff``; ``exact`` covers both).

    Raises:
        WorkloadError: a model that cannot be built; :class:`FrameShapeError` if it fails on
            the frames it is given.

    Returns:
        one dict per model with the keys of ``COLUMNS`` (MACs in the ptflops convention,
        latencies as medians in milliseconds, ``state_bytes``, ``max_abs_diff``) and details:
        ``exact`` (within float32 tolerances), ``rtol``/``atol``, ``receptive_field``,
        ``delay``, ``stride``, ``threads``, ``device``, ``seconds``, ``other_load`` (CPUs kept
        busy by other processes while the model ran; Linux only, else ``None``), ``windows``.

    Example:
        >>> import torch, costream as cs
        >>> from costream.bench import Workload, run_bench
        >>> net = cs.continual(torch.nn.Sequential(torch.nn.Conv1d(4, 8, 3), torch.nn.ReLU(),
        ...                                        torch.nn.Conv1d(8, 2, 3)))
        >>> [row] = run_bench([Workload("tiny", net, (4,), clip_length=5)], steps=5,
        ...                   progress=False)
        >>> row["exact"], row["macs_clip"] == 8 * 4 * 3 * 3 + 8 * 3 + 8 * 3 + 2 * 8 * 3 + 2
        (True, True)
    """
    dev = torch.device(device)
    names = list(DEFAULT_MODELS if models is None else models)
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    from ..runtime._backends import BACKENDS

    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    bar = _progress_bar(len(names), progress)
    rows: list[dict[str, Any]] = []
    try:
        for spec in names:
            label = spec if isinstance(spec, str) else spec.name

            def stage(text: str, label: str = label) -> None:
                if bar is not None:
                    bar.set_description_str(f"{label}: {text}")

            stage("building")
            t0 = time.perf_counter()
            jiffies = _cpu_jiffies()
            try:
                w = resolve_workload(spec, frame_shape, temporal_window=temporal_window,
                                     seed=seed, trust=trust)
            except (KeyError, ValueError, TypeError, ImportError, AttributeError,
                    OSError) as err:
                text = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
                raise WorkloadError(f"{label}: {text}") from err
            torch.manual_seed(seed)
            try:
                with torch.inference_mode():
                    row = _measure(w, batch_size, steps, dev, window_factors, stage,
                                   backend)
            except FrameShapeError as err:
                raise FrameShapeError(f"{label} {err}") from err.__cause__
            seconds = time.perf_counter() - t0
            row.update(threads=torch.get_num_threads(), device=str(dev), seconds=seconds,
                       other_load=_other_load(jiffies, seconds))
            rows.append(row)
            w.net.reset_state()
            del w
            gc.collect()
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        torch.set_num_threads(previous_threads)
    return rows


def _progress_bar(total: int, enabled: bool) -> Any:
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="model", file=sys.stderr, leave=False, dynamic_ncols=True)
