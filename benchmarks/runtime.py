"""Runtime benchmark: the multi-stream engine vs stepping streams one by one, and per-step
latency of eager, compiled (torch.compile) and onnxruntime stepping.

    python benchmarks/runtime.py                    # full run: benchmarks/results/runtime.*
    python benchmarks/runtime.py --wait-quiet 1800  # the same, once the machine is idle
    python benchmarks/runtime.py --quick            # smoke run (writes runtime_quick.*)

Workloads are those of ``costream bench`` (:func:`costream.bench.resolve_workload`): ``tcn``,
``transformer`` and zoo models such as ``cox3d_xs`` at their native frame size.

* Engine: ``--streams`` streams, all open, stepped for a fixed number of steps after the warm-up:
  one :class:`costream.runtime.StreamEngine` step (one batched call) against stepping each stream
  with its own ``forward_step`` (stream holders sharing the network's layers). The one-by-one
  streams resume from the engine's state after its warm-up, so both continue the same streams
  and their outputs are compared. They take turns in blocks of steps, each block starting with
  untimed steps (as ``benchmarks/core.py`` does). Reported: milliseconds per step of all
  streams (medians of the measured steps, nothing extrapolated). ``name@N`` steps the engine
  in blocks of ``N`` streams (``StreamEngine(max_batch=N)``).
* Backends: batch-1 latency per step of eager ``forward_step``, the step compiled with
  :func:`costream.runtime.compile_step` (inductor) and the ONNX export run in onnxruntime, plus
  the largest difference of the compiled and onnxruntime outputs from eager stepping.

Ratios are measured side by side (interleaved) in one run. The machine may be shared: each row
records the CPUs that other processes kept busy while it ran (from ``/proc/stat``, this
process's own CPU time subtracted).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from _common import OtherLoad, gemm_rate, write_report

from costream.bench import resolve_workload, step_macs
from costream.bench._report import cpu_model
from costream.core import tree_map
from costream.runtime import StreamEngine, compile_step

DEFAULT_ENGINE = ("tcn", "transformer", "cox3d_xs", "cox3d_xs@8", "cox3d_xs@auto")
DEFAULT_BACKENDS = ("tcn", "transformer", "cox3d_xs")
BLOCK, WARM_IN = 5, 2  # engine benchmark: timed steps per block, untimed steps before them
FAST_ENGINE, FAST_STEPS_FACTOR = ("tcn",), 5  # workloads timed for 5x --steps


def wait_quiet(max_wait: float, threshold: float = 0.5) -> dict[str, Any]:
    """Wait (up to ``max_wait`` s) until the 1-minute load average is below ``threshold``."""
    t0 = time.perf_counter()
    while os.getloadavg()[0] >= threshold and time.perf_counter() - t0 < max_wait:
        time.sleep(10.0)
    load = os.getloadavg()[0]
    return {"waited_s": round(time.perf_counter() - t0, 1), "load": load,
            "quiet": load < threshold}


def _median_ms(times: list[float]) -> float:
    return statistics.median(times) * 1e3


def _timed(fn: Callable[[], Any], out: list[float]) -> Any:
    t0 = time.perf_counter()
    result = fn()
    out.append(time.perf_counter() - t0)
    return result


def bench_engine(spec: str, streams: int, steps: int, peak: float) -> dict[str, Any]:
    """``streams`` streams: one batched engine step vs one ``forward_step`` per stream.

    ``peak`` (MACs/s of a large GEMM) bounds the speedup any batching can give: the engine
    needs at least ``streams * MACs per step / peak`` seconds per step of all streams.
    """
    name, _, blocks = spec.partition("@")
    max_batch = (blocks if blocks == "auto" else int(blocks)) if blocks else None
    w = resolve_workload(name)
    net, frame = w.net.eval(), w.frame_shape
    macs = step_macs(copy.deepcopy(net), torch.randn(1, *frame))
    engine = StreamEngine(net, capacity=streams, frame_shape=frame, max_batch=max_batch)
    ids = [engine.open() for _ in range(streams)]
    meter = OtherLoad()
    warm = net.delay + 1
    with torch.inference_mode():
        t0 = time.perf_counter()
        for _ in range(warm):
            engine.step({i: torch.randn(frame) for i in ids})
        warm_s = time.perf_counter() - t0
        # one-by-one: stream holders sharing the layers, resumed from the engine's streams
        solo = []
        tree = engine.state_dict()["tree"]
        for i in ids:
            holder = copy.copy(net)
            holder.set_state({"tree": tree_map(lambda t, i=i: t[i:i + 1], tree),
                              "age": torch.tensor([engine.frames_seen(i)]), "phase": 0,
                              "frame_shape": frame})
            solo.append(holder)
        t_engine: list[float] = []
        t_solo: list[float] = []
        diff = 0.0
        # blocks of steps, each implementation in turn; the first WARM_IN steps of a block run
        # untimed, so that each is timed with its own weights and state back in cache, as when
        # it runs alone (stepping 64 separate streams in between evicts the engine's, and back)
        timed = 0
        while timed < steps:
            n = min(BLOCK, steps - timed)
            block = [torch.randn(streams, *frame) for _ in range(WARM_IN + n)]
            inputs = [dict(zip(ids, f, strict=True)) for f in block]
            rows = [[x.unsqueeze(0) for x in f] for f in block]
            outs = []
            for j, d in enumerate(inputs):
                outs.append(_timed(lambda d=d: engine.step(d), t_engine if j >= WARM_IN else []))
            for j, r in enumerate(rows):
                ref = _timed(lambda r=r: [m.forward_step(x) for m, x in zip(solo, r, strict=True)],
                             t_solo if j >= WARM_IN else [])
                diff = max(diff, *(float((outs[j][i] - y[0]).abs().max())
                                   for i, y in zip(ids, ref, strict=True)))
            timed += n
    e, s = _median_ms(t_engine), _median_ms(t_solo)
    floor = streams * macs / peak * 1e3
    return {"streams": streams, "max_batch": engine.max_batch, "frame_shape": list(frame),
            "macs_per_stream_step": macs, "compute_floor_ms": floor,
            "speedup_ceiling": s / floor,
            "steps_timed": steps,
            "warm_up_steps": warm, "engine_warm_up_s": warm_s, "engine_ms": e,
            "one_by_one_ms": s, "engine_frames_per_s": streams / e * 1e3,
            "one_by_one_frames_per_s": streams / s * 1e3, "speedup": s / e,
            "max_abs_diff": diff, "other_cpus": meter.others()}


def bench_backends(name: str, repeats: int, inner: int, threads: int) -> dict[str, Any]:
    """Batch-1 latency per step: eager ``forward_step``, compiled step, onnxruntime."""
    from costream.export import OnnxStreamRunner, export_onnx

    w = resolve_workload(name)
    net, frame = w.net.eval(), w.frame_shape
    s = net.temporal.stride
    warm = net.delay // s + 2
    clips = [torch.randn(1, frame[0], s, *frame[1:]) for _ in range(warm + 1)]
    res: dict[str, Any] = {"frame_shape": list(frame), "stride": s}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.onnx"
        t0 = time.perf_counter()
        export_onnx(net, path, frame)
        res["export_s"] = time.perf_counter() - t0
        # no spin-waiting: spinning threads would take the cores from the torch steps
        # measured right after them
        runner = OnnxStreamRunner(path, threads=threads, spin=False)
        step = compile_step(net, force=True)  # inductor on the CPU (no eager fallback)
        state = net.init_state(1, frame)
        diffs = {"compiled": 0.0, "onnxruntime": 0.0}
        with torch.inference_mode():
            net.reset_state()
            t0 = time.perf_counter()
            _, state = step(clips[0], state)
            res["compile_s"] = time.perf_counter() - t0
            state = net.init_state(1, frame)
            for clip in clips:  # warm-up, comparing the three on the same frames
                y_c, state = step(clip, state)
                y_o, _ = runner.step(clip.numpy())
                for t in range(s):
                    y_e = net.forward_step(clip[:, :, t])
                if y_e is not None:
                    diffs["compiled"] = max(diffs["compiled"], float((y_c - y_e).abs().max()))
                    diffs["onnxruntime"] = max(diffs["onnxruntime"],
                                               float(abs(y_o - y_e.numpy()).max()))
            holder = {"state": state}

            def eager() -> None:
                for t in range(s):
                    net.forward_step(x[:, :, t])

            def compiled() -> None:
                _, holder["state"] = step(x, holder["state"])

            x, xn = clips[-1], clips[-1].numpy()
            t_e: list[float] = []
            t_c: list[float] = []
            t_o: list[float] = []
            plan = [(eager, t_e), (compiled, t_c), (lambda: runner.step(xn), t_o)]
            meter = OtherLoad()
            for r in range(repeats):
                for fn, out in plan[r % 3:] + plan[:r % 3]:  # rotate the order
                    fn()  # one untimed step: the previous backend evicted this one's caches
                    t0 = time.perf_counter()
                    for _ in range(inner):
                        fn()
                    out.append((time.perf_counter() - t0) / inner)
    res.update({"eager_ms": _median_ms(t_e), "compiled_ms": _median_ms(t_c),
                "onnxruntime_ms": _median_ms(t_o),
                "compiled_speedup": _median_ms(t_e) / _median_ms(t_c),
                "onnxruntime_speedup": _median_ms(t_e) / _median_ms(t_o),
                "max_abs_diff": diffs, "other_cpus": meter.others()})
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="few steps; writes runtime_quick.*")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--streams", type=int, default=64)
    p.add_argument("--steps", type=int, default=20,
                   help="engine: measured steps of all streams after the warm-up (tcn: 5x)")
    p.add_argument("--engine", nargs="*", default=list(DEFAULT_ENGINE),
                   help="workloads for the engine vs one-by-one comparison")
    p.add_argument("--backends", nargs="*", default=list(DEFAULT_BACKENDS),
                   help="workloads timed for eager / compiled / onnxruntime stepping")
    p.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                   help="first wait up to SECONDS for a 1-minute load average below 0.5")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args()
    quiet = wait_quiet(args.wait_quiet) if args.wait_quiet > 0 else None
    # compile times are those of a first compilation: no inductor cache from earlier runs
    cache = tempfile.mkdtemp(prefix="costream-inductor-")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    steps, repeats, inner = (3, 3, 2) if args.quick else (args.steps, 21, 5)
    results: dict[str, Any] = {"engine": {}, "backends": {}}
    peak = gemm_rate()
    results["peak_gemm_macs_per_s"] = peak
    print(f"peak GEMM rate {peak / 1e9:.1f} GMAC/s", flush=True)
    for name in args.engine:
        # a cheap step gets more timed steps: its medians are otherwise the noisiest
        n = steps * FAST_STEPS_FACTOR if name in FAST_ENGINE and not args.quick else steps
        results["engine"][name] = bench_engine(name, args.streams, n, peak)
        print(name, "engine", json.dumps(results["engine"][name]), flush=True)
    for name in args.backends:
        torch.manual_seed(0)
        results["backends"][name] = bench_backends(name, repeats, inner, args.threads)
        print(name, "backends", json.dumps(results["backends"][name]), flush=True)
    results["machine"] = {"torch": torch.__version__, "threads": args.threads, "cpu": cpu_model(),
                          "cores": os.cpu_count(), "python": platform.python_version(),
                          "wait_quiet": quiet}
    shutil.rmtree(cache, ignore_errors=True)
    write_report(Path(args.out), "runtime_quick" if args.quick else "runtime", results,
                 _markdown(results, args))


def _load(r: dict[str, Any]) -> str:
    v = r["other_cpus"]
    return "n/a" if v is None else f"{v:.2f}"


def _markdown(r: dict[str, Any], args: argparse.Namespace) -> str:
    m = r["machine"]
    cmd = "python benchmarks/runtime.py"
    if args.threads != 2:
        cmd += f" --threads {args.threads}"
    if args.streams != 64:
        cmd += f" --streams {args.streams}"
    if args.wait_quiet:
        cmd += f" --wait-quiet {args.wait_quiet:g}"
    quiet = m["wait_quiet"]
    lines = [
        "# Runtime benchmark", "",
        f"Command: `{cmd}`  ",
        f"Machine: {m['cpu']} ({m['cores']} cores), torch {m['torch']}, {m['threads']} threads."
        " Medians of interleaved measurements. Other load: CPUs kept busy by other processes "
        "while a row was measured"
        + (f"; the run waited {quiet['waited_s']:.0f} s for a 1-minute load average of "
           f"{quiet['load']:.2f}." if quiet else "."), "",
        f"## {args.streams} streams: engine (one batched step) vs one `forward_step` per stream",
        "",
        "Milliseconds per step of all streams, measured over the steps after the warm-up "
        f"(nothing extrapolated), in blocks of {BLOCK} steps per implementation, each block "
        f"after {WARM_IN} untimed steps (so each runs with its own weights and state in cache, "
        "as when it runs alone); max abs diff: engine vs one-by-one outputs over every step.",
        "",
        "Compute floor: the time the step's multiply-accumulates (MACs per stream step x "
        f"{args.streams}) take at the rate of a large float32 GEMM on this machine (the faster "
        f"of the BLAS and oneDNN), measured in the same run "
        f"({r['peak_gemm_macs_per_s'] / 1e9:.1f} GMAC/s). No batching can step all streams "
        "faster, so one-by-one ms / floor ms bounds the speedup (ceiling).", "",
        "| workload | frame | streams per call | engine ms | one-by-one ms | speedup | "
        "MACs per stream step | compute floor ms | speedup ceiling | engine frames/s | steps | "
        "max abs diff | other load |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for spec, e in r["engine"].items():
        frame = "x".join(map(str, e["frame_shape"]))
        lines.append(f"| {spec.partition('@')[0]} | {frame} | {e['max_batch']} | "
                     f"{e['engine_ms']:.2f} | {e['one_by_one_ms']:.2f} | "
                     f"{e['speedup']:.1f}x | {e['macs_per_stream_step'] / 1e6:.2f} M | "
                     f"{e['compute_floor_ms']:.2f} | {e['speedup_ceiling']:.1f}x | "
                     f"{e['engine_frames_per_s']:.0f} | "
                     f"{e['steps_timed']} | {e['max_abs_diff']:.1e} | {_load(e)} |")
    lines += [
        "", "## Per-step latency at batch 1", "",
        "One step = `stride` frames in, one output out. Compiled: `compile_step` (inductor, "
        "fullgraph; compile s: its first call, without an inductor cache); onnxruntime: "
        "`export_onnx` + `OnnxStreamRunner` (no spin-waiting threads). Max abs diff: against "
        "eager stepping over the warm-up.", "",
        "| workload | eager ms | compiled ms | compiled speedup | onnxruntime ms | "
        "onnxruntime speedup | compile s | export s | max abs diff (compiled / ort) | "
        "other load |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, b in r["backends"].items():
        d = b["max_abs_diff"]
        lines.append(f"| {name} | {b['eager_ms']:.3f} | {b['compiled_ms']:.3f} | "
                     f"{b['compiled_speedup']:.2f}x | {b['onnxruntime_ms']:.3f} | "
                     f"{b['onnxruntime_speedup']:.2f}x | {b['compile_s']:.1f} | "
                     f"{b['export_s']:.1f} | {d['compiled']:.1e} / {d['onnxruntime']:.1e} | "
                     f"{_load(b)} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
