"""Sweep benchmark: costream against continual-inference 1.2.4 and a sliding window on workloads
drawn from a fixed seed, with the roofline floor of every step.

Workloads (``_sweep_workloads.py``): TCNs (channels 32-512, kernel 2-7, dilation 1-4, 4-12
layers, with and without residual blocks), 3D CNNs (channels 16-96, frames 32-128 px, temporal
kernel 3 or 5, spatial strides, with and without batch norm) and Transformer encoders (d
128-768, 2-12 heads, window 16-128, 1-4 layers), batch 1, float32, eval mode,
``torch.inference_mode()``. Every workload is checked first: costream's and the anchor's
stepped outputs against the torch model on the window clip, and against each other (1e-4).

Timed side by side, interleaved in blocks (order rotating per repeat): costream's
``forward_step`` (eager), the anchor's ``forward_step``, the sliding window (the torch model on
a buffer shifted by one frame) and costream's step in onnxruntime and OpenVINO
(``costream.runtime.make_step``, one exported graph per workload). Per workload: the latency
ratios, MACs per step (matrix products and convolutions, ``FlopCounterMode``), achieved GMAC/s
and the roofline floor ``max(MACs / peak GEMM rate, bytes / memory bandwidth)`` with both
rates measured in the same run at the same thread count (bytes: parameters read once, the
state read and written, the frame and the output); ``floor / fastest step`` is the fraction
of the physical limit reached.

Usage::

    python benchmarks/sweep.py                 # 30 workloads, 1 and 2 threads -> sweep.{json,md}
    python benchmarks/sweep.py --quick         # 3 tiny workloads, 1 thread -> sweep_quick.*
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import continual
import torch
from _common import OtherLoad, machine, peaks, write_report
from _sweep_report import to_markdown
from _sweep_workloads import FAMILIES, QUICK, Spec, build, draw
from torch import Tensor, nn
from transformer import counted_macs

from core import SlidingWindow, reset, state_bytes
from core import verify as verify_clip
from costream.export import export_onnx
from costream.runtime import make_step

COUNTS = {"tcn": 12, "cnn3d": 9, "transformer": 9}
TARGETS = {"tcn": 8.0, "cnn3d": 6.0, "transformer": 4.0}  # median anchor / costream
FLOOR_RATIO = 3.0  # no workload below


# ---------------------------------------------------------------------------- checks
class _Window:
    """Sliding window for a Transformer encoder: the newest token's output."""

    def __init__(self, model: nn.Module, clip: Tensor, n: int) -> None:
        self.model, self.buffer = model, clip[:, :, :n].transpose(1, 2).contiguous()

    def forward_step(self, token: Tensor) -> Tensor:
        self.buffer = torch.cat((self.buffer[:, 1:], token.unsqueeze(1)), 1)
        return self.model(self.buffer)[:, -1]


def _stepped(module: nn.Module, clip: Tensor) -> list[Tensor | None]:
    reset(module)
    with torch.inference_mode():
        out = [module.forward_step(clip[:, :, t]) for t in range(clip.shape[2])]
    reset(module)
    return out


def check(spec: Spec, b: dict[str, Any]) -> dict[str, Any]:
    """Stepped outputs of costream and the anchor against the model and each other."""
    model, clip, co, an = b["model"], b["clip"], b["costream"], b["anchor"]
    if spec.family != "transformer":
        verify_clip(f"{spec.name}/costream", co, model, clip)
        verify_clip(f"{spec.name}/anchor", an, model, clip)
        ref = None
    else:
        n = spec.params["window"]
        with torch.inference_mode():
            ref = model(clip.unfold(2, n, 1).permute(0, 2, 3, 1)[0])[:, -1]
    c = _stepped(co, clip)
    out: dict[str, Any] = {"equals_anchor": None, "costream_vs_anchor": None}
    if an is not None:
        a = _stepped(an, clip)
        due = [t for t in range(clip.shape[2]) if a[t] is not None and c[t] is not None]
        diff = max(float((a[t] - c[t]).abs().max()) for t in due)
        scale = max(1.0, max(float(c[t].abs().max()) for t in due))
        out = {"costream_vs_anchor": diff, "compared_outputs": len(due),
               "output_scale": scale, "equals_anchor": diff <= 1e-4 * scale}
    if ref is not None:
        first = spec.params["window"] - 1
        got = torch.cat([c[t] for t in range(first, clip.shape[2])])
        out["costream_vs_model"] = float((got - ref).abs().max())
        out["compared_outputs_model"] = int(got.shape[0])
        if an is not None:
            out["anchor_vs_model"] = float((torch.cat(
                [a[t] for t in range(first, clip.shape[2])]) - ref).abs().max())
        if out["costream_vs_model"] > 1e-4:
            raise AssertionError(f"{spec.name}: costream differs from the torch model by "
                                 f"{out['costream_vs_model']:.2e}")
    return out


def _mean_step_macs(module: nn.Module, clip: Tensor) -> float:
    """MACs of the last two steps of ``module`` over ``clip`` from a fresh stream, per step
    (a paired conv splits its work unevenly between two consecutive steps)."""
    reset(module)
    for t in range(clip.shape[2] - 2):
        module.forward_step(clip[:, :, t])
    return counted_macs(lambda: (module.forward_step(clip[:, :, -2]),
                                 module.forward_step(clip[:, :, -1])))["total"] / 2


def static(spec: Spec, b: dict[str, Any]) -> dict[str, Any]:
    """MACs and bytes of one steady-state costream step (MACs: the mean of two consecutive
    steps, which a paired conv splits unevenly)."""
    co, clip = b["costream"], b["clip"]
    with torch.inference_mode():
        macs = _mean_step_macs(co, clip)
        state = state_bytes(co.get_state()["tree"])
        y = co.forward_step(clip[:, :, 0])
        anchor_macs = None
        if b["anchor"] is not None:  # what the anchor executes per step
            anchor_macs = _mean_step_macs(b["anchor"], clip)
            reset(b["anchor"])
    reset(co)
    params = sum(p.numel() * p.element_size() for p in co.parameters())
    frame = clip[:, :, 0].numel() * 4
    return {"macs": macs, "anchor_macs": anchor_macs, "param_bytes": params,
            "state_bytes": state,
            "bytes": params + 2 * state + frame + y.numel() * 4,
            "layers": sum(1 for m in b["model"].modules() if isinstance(
                m, (nn.Conv1d, nn.Conv3d, nn.Linear, nn.MultiheadAttention)))}


# ---------------------------------------------------------------------------- timing
def steppers(spec: Spec, b: dict[str, Any], onnx: Path | None, backends: list[str],
             threads: int) -> dict[str, Callable[[Tensor], Any]]:
    model, clip, co, an = b["model"], b["clip"], b["costream"], b["anchor"]
    window = (_Window(model, clip, spec.params["window"]) if spec.family == "transformer"
              else SlidingWindow(model, clip))
    out = {"costream": co.forward_step, "window": window.forward_step}
    if an is not None:
        out["anchor"] = an.forward_step
    for backend in backends:
        step = make_step(co, backend, frame_shape=tuple(clip.shape[1:2] + clip.shape[3:]),
                         threads=threads, onnx=onnx)
        state = co.init_state(1, tuple(clip.shape[1:2] + clip.shape[3:]))

        def go(frame: Tensor, step=step, box=[state]) -> Any:  # noqa: B006 (per closure)
            y, box[0] = step(frame.unsqueeze(2), box[0])
            return y

        out[backend] = go
    return out


def skeleton(spec: Spec) -> Spec:
    """The workload's structure with almost no arithmetic: the same layers, kernels, dilations,
    strides and window at 4 channels (3D CNNs: 8 x 8 frames; Transformers: 2 dimensions per
    head). Its step time is the fixed cost of stepping that many layers on this machine."""
    p = dict(spec.params)
    if spec.family == "tcn":
        p["channels"] = 4
    elif spec.family == "cnn3d":
        p.update(channels=[4] * len(p["channels"]), frame_px=8)
    else:
        p.update(d=2 * p["heads"], ff=4 * p["heads"])
    return Spec(spec.family, f"{spec.name}_skeleton", p)


def time_skeleton(skel: dict[str, Any], threads: int, steps: int = 200) -> float:
    """Median µs of one eager costream step of a built :func:`skeleton`."""
    torch.set_num_threads(threads)
    co, clip = skel["costream"], skel["clip"]
    frames = [clip[:, :, t].contiguous() for t in range(clip.shape[2])]
    ns = []
    with torch.inference_mode():
        for f in frames:  # past the warm-up
            co.forward_step(f)
        for i in range(steps):
            t0 = time.perf_counter_ns()
            co.forward_step(frames[i % len(frames)])
            ns.append(time.perf_counter_ns() - t0)
    return statistics.median(ns) / 1e3


def time_workload(spec: Spec, b: dict[str, Any], onnx: Path | None, backends: list[str],
                  threads: int, repeats: int, block_s: float) -> dict[str, Any]:
    """Interleaved blocks of steps (order rotating); per-step medians in µs."""
    torch.set_num_threads(threads)
    clip = b["clip"]
    frames = [clip[:, :, t].contiguous() for t in range(clip.shape[2])]
    impls = steppers(spec, b, onnx, backends, threads)
    pos = dict.fromkeys(impls, 0)
    clock = time.perf_counter_ns

    def run(name: str, n: int) -> list[float]:
        """``n`` samples, each the mean of two consecutive steps: a paired conv's steps
        alternate between a pair's first (k frame convolutions) and second (one), so a single
        step's median would report either; two steps hold one of each."""
        ns = []
        for _ in range(n):
            f = frames[pos[name] % len(frames)]
            g = frames[(pos[name] + 1) % len(frames)]
            pos[name] += 2
            t0 = clock()
            impls[name](f)
            impls[name](g)
            ns.append((clock() - t0) / 2)
        return ns

    meter = OtherLoad()
    with torch.inference_mode():
        for m in (b["costream"], b["anchor"]):
            if m is not None:
                reset(m)
        block = {}
        for name in impls:  # past every warm-up (the window has none); block size from a few
            run(name, 2 if name == "window" else clip.shape[2])
            est = statistics.median(run(name, 3)) / 1e9
            block[name] = max(1, min(50, round(block_s / max(est, 1e-7))))
        samples: dict[str, list[int]] = {k: [] for k in impls}
        names = list(impls)
        for r in range(repeats):
            for j in range(len(names)):
                name = names[(r + j) % len(names)]
                run(name, 1)  # its own weights back in cache
                samples[name] += run(name, block[name])
    for m in (b["costream"], b["anchor"]):
        if m is not None:
            reset(m)
    lat = {k: statistics.median(v) / 1e3 for k, v in samples.items()}
    return {"threads": threads, "latency_us": lat, "steps": {k: len(v) for k, v in
                                                             samples.items()},
            "other_processes_cpus": meter.others()}


def derive(res: dict[str, Any], st: dict[str, Any], peak: dict[str, float]) -> None:
    """Ratios, GMAC/s and the roofline floor of one timed result (in place)."""
    lat = res["latency_us"]
    steppers_ = [k for k in lat if k not in ("anchor", "window")]
    best = min(steppers_, key=lambda k: lat[k])
    compute_us = st["macs"] / (peak["gemm_gmacs"] * 1e3)
    memory_us = st["bytes"] / (peak["bandwidth_gbs"] * 1e3)
    floor = max(compute_us, memory_us)
    anchor = lat.get("anchor")
    res.update(
        anchor_over_costream=None if anchor is None else anchor / lat["costream"],
        window_over_costream=lat["window"] / lat["costream"],
        best_backend=best, anchor_over_best=None if anchor is None else anchor / lat[best],
        window_over_best=lat["window"] / lat[best],
        gmacs_costream=st["macs"] / (lat["costream"] * 1e3),
        gmacs_best=st["macs"] / (lat[best] * 1e3),
        floor_us=floor, floor_bound="compute" if compute_us >= memory_us else "memory",
        floor_fraction=floor / lat[best],
        ceiling=None if anchor is None else anchor / floor,
        overhead_per_layer_us=(lat[best] - floor) / max(1, st["layers"]))
    if "skeleton_us" in res:  # runs recorded before it was measured have none
        res["skeleton_fraction"] = res["skeleton_us"] / lat[best]


# ---------------------------------------------------------------------------- main
def summarise(rows: list[dict[str, Any]], threads: list[int]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for t in threads:
        for fam in FAMILIES:
            rs = [r["timing"][str(t)] for r in rows
                  if r["family"] == fam and r["timing"][str(t)]["anchor_over_costream"]]
            if not rs:
                continue
            eager = [x["anchor_over_costream"] for x in rs]
            best = [x["anchor_over_best"] for x in rs]
            ceiling = [x["ceiling"] for x in rs]
            out[f"{fam}/{t}"] = {
                "median": statistics.median(eager), "worst": min(eager),
                "median_best_backend": statistics.median(best), "worst_best_backend": min(best),
                "median_ceiling": statistics.median(ceiling), "worst_ceiling": min(ceiling),
                "target": TARGETS[fam], "met": statistics.median(eager) >= TARGETS[fam]
                and min(eager) >= FLOOR_RATIO, "workloads": len(rs),
                "without_anchor": sum(1 for r in rows if r["family"] == fam) - len(rs)}
    return out


def rerender(path: Path) -> dict[str, Any]:
    """Derived columns and summary of a recorded run recomputed from its own measurements."""
    report = json.loads(Path(path).read_text())
    for row in report["rows"]:
        for t, res in row["timing"].items():
            derive(res, row["static"], report["peaks"][t])
    report["summary"] = summarise(report["rows"], [int(t) for t in report["threads"]])
    stem = Path(path).stem
    write_report(Path(path).parent, stem, report, to_markdown(report))
    return report


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=0, help="seed of the drawn workloads")
    p.add_argument("--threads", type=int, nargs="+", default=None,
                   help="thread counts (default: 1 2; 1 with --quick)")
    p.add_argument("--backends", nargs="*", default=["onnxruntime", "openvino"],
                   choices=["onnxruntime", "openvino"],
                   help="runtimes timed next to eager costream (default: both)")
    p.add_argument("--repeats", type=int, default=None, help="interleaved repeats (default 5)")
    p.add_argument("--quick", action="store_true",
                   help="3 tiny workloads, 1 thread: a smoke run (writes sweep_quick.*)")
    p.add_argument("--check-only", action="store_true",
                   help="build and check every workload, time nothing, write nothing")
    p.add_argument("--only", nargs="+", default=None, metavar="NAME",
                   help="time only these workloads or families (tcn, cnn3d, transformer); "
                        "writes sweep_only.* so the committed full run stays whole")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--rerender", type=Path, default=None, metavar="JSON",
                   help="recompute the derived columns of a recorded run's JSON (its own "
                        "measurements) and rewrite its JSON and Markdown; time nothing")
    args = p.parse_args(argv)
    if args.rerender is not None:
        return rerender(args.rerender)
    raw = sys.argv[1:] if argv is None else argv
    threads = args.threads or ([1] if args.quick else [1, 2])
    repeats = args.repeats or (2 if args.quick else 5)
    block_s = 0.005 if args.quick else 0.06
    specs = QUICK if args.quick else draw(args.seed, COUNTS)
    if args.only:
        known = {x.name for x in specs} | {x.family for x in specs}
        unknown = sorted(set(args.only) - known)
        if unknown:
            p.error(f"--only: no workload or family {', '.join(unknown)} (known: "
                    f"{', '.join(sorted(known))})")
        specs = [x for x in specs if x.name in args.only or x.family in args.only]
    # families take turns, so that a partial run covers each of them
    by_family = [[x for x in specs if x.family == f] for f in FAMILIES]
    specs = [x for group in zip(*by_family) for x in group] + [
        x for group in by_family for x in group[min(map(len, by_family)):]]
    stem = "sweep_quick" if args.quick else "sweep_only" if args.only else "sweep"
    report: dict[str, Any] = {
        "command": shlex.join(["python", "benchmarks/sweep.py", *raw]),
        "machine": machine(continual_inference=continual.__version__), "seed": args.seed,
        "threads": threads, "backends": ["eager", *args.backends], "rows": []}
    start = time.perf_counter()
    start_peaks = {str(t): peaks(t, args.quick) for t in threads}
    report["peaks"] = start_peaks
    tmp = tempfile.TemporaryDirectory()
    for spec in specs:
        t_row = time.perf_counter()
        b = build(spec, args.seed)
        row = {"name": spec.name, "family": spec.family, "params": spec.params,
               "dense_anchor": b["dense_anchor"], "check": check(spec, b),
               "static": static(spec, b), "timing": {}}
        if args.check_only:
            print(f"[{spec.name}] {spec.describe()}: {row['check']}, "
                  f"{row['static']['macs'] / 1e6:.1f} M MACs", flush=True)
            continue
        onnx = None
        if args.backends:
            onnx = Path(tmp.name) / f"{spec.name}.onnx"
            t0 = time.perf_counter()
            export_onnx(b["costream"], onnx, tuple(b["clip"].shape[1:2] + b["clip"].shape[3:]))
            row["export_s"] = time.perf_counter() - t0
        skel = build(skeleton(spec), args.seed)  # once per workload, timed per thread count
        for t in threads:
            res = time_workload(spec, b, onnx, args.backends, t, repeats, block_s)
            res["skeleton_us"] = time_skeleton(skel, t)
            derive(res, row["static"], report["peaks"][str(t)])
            row["timing"][str(t)] = res
            ratio = res["anchor_over_costream"]
            print(f"[{spec.name} {t} thr] anchor/costream "
                  f"{'-' if ratio is None else f'{ratio:.2f}x'}, "
                  f"window/best {res['window_over_best']:.2f}x ({res['best_backend']}), floor "
                  f"{100 * res['floor_fraction']:.0f} % (rates measured at the start; the "
                  f"report takes the better of start and end), other load "
                  f"{res['other_processes_cpus'] or 0:.2f}", flush=True)
        row["seconds"] = time.perf_counter() - t_row
        report["rows"].append(row)
        del b
        # after every workload: a partial report (rates measured at the start only)
        report.update(complete=False, summary=summarise(report["rows"], threads),
                      elapsed_s=time.perf_counter() - start)
        write_report(args.out, stem, report, to_markdown(report))
    if args.check_only:
        return report
    # the machine's rates: the better of the measurements before and after the workloads
    end_peaks = {str(t): peaks(t, args.quick) for t in threads}
    report["peaks"] = {t: {k: max(v, end_peaks[t][k]) for k, v in p.items()}
                       for t, p in start_peaks.items()}
    report["peaks_measured"] = {"start": start_peaks, "end": end_peaks}
    for row in report["rows"]:
        for t, res in row["timing"].items():
            derive(res, row["static"], report["peaks"][t])
    report["summary"] = summarise(report["rows"], threads)
    report["elapsed_s"] = time.perf_counter() - start
    report["complete"] = True
    write_report(args.out, stem, report, to_markdown(report))
    return report


if __name__ == "__main__":
    main()
