"""Runtime benchmark: the multi-stream engine vs stepping streams one by one, and per-step
latency of eager, compiled (torch.compile) and onnxruntime stepping.

    python benchmarks/runtime.py              # full run, writes benchmarks/results/runtime.*
    python benchmarks/runtime.py --quick      # smoke run

Medians of interleaved repeats; ratios are measured side by side in the same run.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import costream as cs
from costream.runtime import StreamEngine, compile_step


def tcn() -> tuple[nn.Module, tuple[int, ...]]:
    layers: list[nn.Module] = []
    for i in range(10):
        layers += [nn.Conv1d(256, 256, 3, padding=1)] + ([nn.ReLU()] if i < 9 else [])
    return nn.Sequential(*layers), (256,)


def tiny() -> tuple[nn.Module, tuple[int, ...]]:
    return nn.Sequential(nn.Conv1d(16, 16, 3, padding=1), nn.ReLU(),
                         nn.Conv1d(16, 16, 3, padding=1), nn.ReLU(),
                         nn.Conv1d(16, 16, 3, padding=1)), (16,)


def cnn3d() -> tuple[nn.Module, tuple[int, ...]]:
    chs = [3, 24, 24, 48, 48, 96, 96, 96, 96]
    layers: list[nn.Module] = []
    for i in range(8):
        stride = (1, 2, 2) if i in (0, 2, 4) else 1
        layers += [nn.Conv3d(chs[i], chs[i + 1], 3, stride=stride, padding=1),
                   nn.BatchNorm3d(chs[i + 1]), nn.ReLU()]
    return nn.Sequential(*layers), (3, 112, 112)


def cox3d_xs() -> tuple[nn.Module, tuple[int, ...]] | None:
    try:
        from costream.models import create_model
    except ImportError:
        return None
    return create_model("cox3d_xs"), (3, 160, 160)


WORKLOADS = {"tcn": tcn, "tiny": tiny, "3d_cnn": cnn3d, "cox3d_xs": cox3d_xs}


def _time(fn, repeats: int, inner: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        out.append((time.perf_counter() - t0) / inner)
    return out


def bench_engine(model: nn.Module, frame: tuple[int, ...], streams: int, repeats: int,
                 inner: int) -> dict:
    """Throughput of ``streams`` streams: one batched engine step vs one module per stream."""
    net = cs.continual(model).eval()
    solo = [cs.continual(model).eval() for _ in range(streams)]
    engine = StreamEngine(net, capacity=streams, frame_shape=frame)
    ids = [engine.open() for _ in range(streams)]
    frames = torch.randn(streams, *frame)
    warm = net.delay + 2
    with torch.inference_mode():
        for _ in range(warm):
            engine.step(dict(zip(ids, frames, strict=True)))
            for m, f in zip(solo, frames, strict=True):
                m.forward_step(f.unsqueeze(0))
        # exactness: the engine's outputs equal the one-by-one outputs
        out = engine.step(dict(zip(ids, frames, strict=True)))
        ref = [m.forward_step(f.unsqueeze(0)) for m, f in zip(solo, frames, strict=True)]
        diff = max(float((out[i] - r[0]).abs().max()) for i, r in zip(ids, ref, strict=True))
        t_engine, t_solo = [], []
        for _ in range(repeats):
            t_engine += _time(lambda: engine.step(dict(zip(ids, frames, strict=True))), 1, inner)
            t_solo += _time(lambda: [m.forward_step(f.unsqueeze(0))
                                     for m, f in zip(solo, frames, strict=True)], 1, inner)
    e, s = statistics.median(t_engine), statistics.median(t_solo)
    return {"streams": streams, "engine_ms": e * 1e3, "one_by_one_ms": s * 1e3,
            "engine_frames_per_s": streams / e, "one_by_one_frames_per_s": streams / s,
            "speedup": s / e, "max_abs_diff": diff}


def bench_backends(model: nn.Module, frame: tuple[int, ...], repeats: int, inner: int) -> dict:
    """Per-step latency at batch 1: eager forward_step, compiled stride step, onnxruntime."""
    from costream.export import OnnxStreamRunner, export_onnx

    net = cs.continual(model).eval()
    s = net.temporal.stride
    x = torch.randn(1, frame[0], s, *frame[1:])
    res: dict = {}
    with torch.inference_mode():
        for _ in range(net.delay + 2):
            net.forward_step(x[:, :, 0])
        eager = lambda: net.forward_step(x[:, :, 0])  # noqa: E731
        step = compile_step(net)
        state = net.init_state(1, frame)
        t0 = time.perf_counter()
        for _ in range(net.delay + 3):
            _, state = step(x, state)
        res["compile_s"] = time.perf_counter() - t0
        holder = {"state": state}

        def compiled():
            _, holder["state"] = step(x, holder["state"])

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.onnx"
        export_onnx(net, path, frame)
        runner = OnnxStreamRunner(path)
        xn = x.numpy()
        for _ in range(net.delay + 2):
            runner.step(xn)
        t_e, t_c, t_o = [], [], []
        with torch.inference_mode():
            for _ in range(repeats):
                t_e += _time(eager, 1, inner)
                t_c += _time(compiled, 1, inner)
                t_o += _time(lambda: runner.step(xn), 1, inner)
    res.update({"eager_ms": statistics.median(t_e) * 1e3,
                "compiled_ms": statistics.median(t_c) * 1e3,
                "onnxruntime_ms": statistics.median(t_o) * 1e3})
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--streams", type=int, default=64)
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    p.add_argument("--backends", nargs="+", default=["tcn", "tiny", "3d_cnn"],
                   help="workloads timed for eager / compiled / onnxruntime stepping")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    repeats, inner = (3, 2) if args.quick else (9, 5)
    results: dict = {"engine": {}, "backends": {}}
    for name in args.workloads:
        built = WORKLOADS[name]()
        if built is None:
            print(f"{name}: skipped (model not available)")
            continue
        model, frame = built
        model.eval()
        if name in ("tcn", "cox3d_xs", "tiny"):
            results["engine"][name] = bench_engine(model, frame, args.streams,
                                                   repeats, max(1, inner // 2))
            print(name, "engine", results["engine"][name])
        if name in args.backends:
            results["backends"][name] = bench_backends(model, frame, repeats, inner)
            print(name, "backends", results["backends"][name])
    results["machine"] = {"torch": torch.__version__, "threads": args.threads,
                          "cpu": _cpu(), "python": platform.python_version()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "runtime.json").write_text(json.dumps(results, indent=2))
    (out / "runtime.md").write_text(_markdown(results, args))


def _cpu() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _markdown(r: dict, args: argparse.Namespace) -> str:
    m = r["machine"]
    lines = [
        "# Runtime benchmark", "",
        f"Command: `python benchmarks/runtime.py --threads {args.threads} --streams "
        f"{args.streams} --workloads {' '.join(args.workloads)} --backends "
        f"{' '.join(args.backends)}`  ",
        f"Machine: {m['cpu']}, torch {m['torch']}, {m['threads']} threads. Medians of "
        "interleaved repeats.", "",
        f"## {args.streams} streams: engine (one batched step) vs one module per stream", "",
        "| workload | engine ms/step | one-by-one ms/step | engine frames/s | speedup | "
        "max abs diff |",
        "|---|---|---|---|---|---|",
    ]
    for name, e in r["engine"].items():
        lines.append(f"| {name} | {e['engine_ms']:.2f} | {e['one_by_one_ms']:.2f} | "
                     f"{e['engine_frames_per_s']:.0f} | {e['speedup']:.1f}x | "
                     f"{e['max_abs_diff']:.1e} |")
    lines += ["", "## Per-step latency at batch 1", "",
              "| workload | eager ms | torch.compile ms | onnxruntime ms | compile time s |",
              "|---|---|---|---|---|"]
    for name, b in r["backends"].items():
        lines.append(f"| {name} | {b['eager_ms']:.3f} | {b['compiled_ms']:.3f} | "
                     f"{b['onnxruntime_ms']:.3f} | {b['compile_s']:.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
