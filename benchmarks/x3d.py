"""X3D-S clip inference against CoX3D-S stepping: latency, peak memory, MACs and predictions.

One run measures, on the CPU at batch 1 (float32, eval mode, ``torch.inference_mode()``):

* **latency per prediction**: X3D-S (the offline original: clip-scope SE, head pool over the
  13-frame clip) on one 13x160x160 clip, against one ``forward_step`` of CoX3D-S (frame-scope
  SE, 13-frame sliding head pool) in steady state. Both share the same weights. The two are
  interleaved (one clip, then 13 steps, per repeat) and summarised by medians and quartiles of
  wall-clock time and of the thread's CPU time (``time.thread_time``; robust to other
  processes on a shared machine). With ``--fold-bn`` both are also measured with batch norms
  folded into the convolutions (:func:`costream.models.fold_batch_norm`).
* **peak memory**: each model runs alone in a fresh subprocess; after a warm-up the peak
  resident set size is reset (``/proc/self/clear_refs``), inference runs, and the new peak
  (``VmHWM``) is read: ``peak`` is the process total, ``inference`` its growth over the resident
  size before inference (activations and, for CoX3D-S, the stream state). Fallback without
  ``/proc``: ``resource.getrusage`` (not reset).
* **MACs** per prediction (ptflops convention, :mod:`costream.bench`).
* **predictions**: CoX3D-S over a stream (its offline counterpart, checked against stepping)
  against X3D-S applied to each 13-frame clip of the stream separately. They differ for two
  reasons, measured apart: the SE scope (clip vs frame, same clips), and temporal padding (a
  clip's convolutions see zero padding at both ends; the stream's see the neighbouring frames).

Usage::

    python benchmarks/x3d.py                      # full run, writes benchmarks/results/x3d.*
    python benchmarks/x3d.py --quick --out /tmp   # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from _common import write_report

from costream.bench import ptflops_macs, ptflops_step_macs
from costream.bench._report import cpu_model
from costream.core import tree_leaves
from costream.models import create_model, fold_batch_norm

T, S = 13, 160  # X3D-S clip: 13 frames of 160x160


def build(fold: bool = False, seed: int = 0) -> tuple[torch.nn.Module, torch.nn.Module]:
    """X3D-S and CoX3D-S with the same random weights (non-trivial batch-norm statistics)."""
    torch.manual_seed(seed)
    offline = create_model("x3d_s", head_activation=None)
    for m in offline.modules():
        if isinstance(m, torch.nn.BatchNorm3d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.1)
    continual = create_model("cox3d_s", head_activation=None)
    continual.load_state_dict(offline.state_dict())
    if fold:
        offline, continual = fold_batch_norm(offline), fold_batch_norm(continual)
    return offline, continual


def smooth_stream(frames: int, seed: int = 1) -> torch.Tensor:
    """A video-like random stream: smooth in space and time, plus a little noise."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(1, 3, frames // 4 + 2, 10, 10, generator=g)
    x = F.interpolate(coarse, size=(frames, S, S), mode="trilinear", align_corners=False)
    return x + 0.1 * torch.randn(x.shape, generator=g)


def _summary(values: list[float]) -> dict[str, float]:
    q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return {"median_ms": q[1] * 1e3, "q1_ms": q[0] * 1e3, "q3_ms": q[2] * 1e3, "n": len(values)}


def latency(offline: torch.nn.Module, continual: torch.nn.Module, repeats: int,
            threads: int) -> dict[str, Any]:
    """Interleaved per-prediction latencies: one clip, then 13 steady-state steps, per repeat."""
    torch.set_num_threads(threads)
    stream = torch.randn(1, 3, continual.delay + 1 + T * (repeats + 1), S, S)
    clip = stream[:, :, :T].contiguous()
    wall: dict[str, list[float]] = {"x3d_s": [], "cox3d_s": []}
    cpu: dict[str, list[float]] = {"x3d_s": [], "cox3d_s": []}
    kernel = {"x3d_s": 0.0, "cox3d_s": 0.0}  # system (kernel) CPU time: page faults, mostly
    continual.reset_state()
    load0 = os.getloadavg()
    with torch.inference_mode():
        offline(clip)  # warm-up
        continual.forward_steps(stream[:, :, :continual.delay + 1])
        i = continual.delay + 1
        for r in range(repeats + 1):
            s0 = _sys_time()
            w0, c0 = time.perf_counter(), time.thread_time()
            offline(clip)
            w1, c1 = time.perf_counter(), time.thread_time()
            if r:
                wall["x3d_s"].append(w1 - w0)
                cpu["x3d_s"].append(c1 - c0)
                kernel["x3d_s"] += _sys_time() - s0
            s0 = _sys_time()
            for _ in range(T):
                frame = stream[:, :, i]
                w0, c0 = time.perf_counter(), time.thread_time()
                y = continual.forward_step(frame)
                w1, c1 = time.perf_counter(), time.thread_time()
                assert y is not None
                i += 1
                if r:
                    wall["cox3d_s"].append(w1 - w0)
                    cpu["cox3d_s"].append(c1 - c0)
            if r:
                kernel["cox3d_s"] += _sys_time() - s0
    continual.reset_state()
    res: dict[str, Any] = {"threads": threads, "repeats": repeats,
                           "loadavg": [load0, os.getloadavg()]}
    for kind, data in (("wall", wall), ("cpu", cpu)):
        res[kind] = {k: _summary(v) for k, v in data.items()}
        res[kind]["ratio"] = res[kind]["x3d_s"]["median_ms"] / res[kind]["cox3d_s"]["median_ms"]
    res["kernel_ms_per_prediction"] = k = {"x3d_s": kernel["x3d_s"] / repeats * 1e3,
                                           "cox3d_s": kernel["cox3d_s"] / (repeats * T) * 1e3}
    c = res["cpu"]
    res["user_ratio"] = ((c["x3d_s"]["median_ms"] - k["x3d_s"]) /
                         (c["cox3d_s"]["median_ms"] - k["cox3d_s"]))
    return res


def _sys_time() -> float:
    """System CPU time of this thread (Linux), else of the process."""
    who = getattr(resource, "RUSAGE_THREAD", resource.RUSAGE_SELF)
    return resource.getrusage(who).ru_stime


def memory_probe(kind: str, fold: bool) -> dict[str, float]:
    """Run in a fresh process: peak RSS during inference of one model."""
    torch.set_num_threads(1)
    offline, continual = build(fold)
    model = offline if kind == "x3d_s" else continual
    del offline, continual
    stream = torch.randn(1, 3, 60, S, S)
    with torch.inference_mode():
        if kind == "x3d_s":
            run = lambda: model(stream[:, :, :T])  # noqa: E731
        else:
            frames = iter(range(60))
            run = lambda: model.forward_step(stream[:, :, next(frames)])  # noqa: E731
            for _ in range(model.delay):  # warm up frame by frame (no clip-sized buffers)
                run()
        run()  # warm-up: allocator and kernel caches
        _trim()
        before = _rss_kb("VmRSS")
        resettable = _reset_peak()
        for _ in range(5):
            run()
        peak = _rss_kb("VmHWM") if resettable else resource.getrusage(
            resource.RUSAGE_SELF).ru_maxrss
    return {"peak_mb": peak / 1024, "before_mb": before / 1024,
            "inference_mb": max(0.0, peak - before) / 1024, "reset_peak": resettable}


def _trim() -> None:
    """Return freed heap memory to the system, so the resident size is what is in use."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _rss_kb(field: str) -> float:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return float(line.split()[1])
    except OSError:
        pass
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def memory(fold: bool) -> dict[str, Any]:
    out = {}
    for kind in ("x3d_s", "cox3d_s"):
        cmd = [sys.executable, __file__, "--memory-probe", kind] + (["--fold-bn"] if fold else [])
        res = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=600)
        out[kind] = json.loads(res.stdout.strip().splitlines()[-1])
    return out


def macs() -> dict[str, float]:
    off = create_model("x3d_s").to("meta")
    co = create_model("cox3d_s").to("meta")
    clip = ptflops_macs(off, torch.empty(1, 3, T, S, S, device="meta"))
    step = ptflops_step_macs(co, torch.empty(1, 3, S, S, device="meta"))
    return {"x3d_s_clip_gmacs": clip / 1e9, "cox3d_s_step_gmacs": step / 1e9,
            "reduction": clip / step}


def _agreement(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    """``a``, ``b``: logits ``(N, classes)``."""
    pa, pb = a.softmax(1), b.softmax(1)
    top5 = [len(set(x.tolist()) & set(y.tolist())) / 5
            for x, y in zip(pa.topk(5).indices, pb.topk(5).indices)]
    return {"top1_agreement": (pa.argmax(1) == pb.argmax(1)).float().mean().item(),
            "top5_overlap": sum(top5) / len(top5),
            "max_abs_prob_diff": (pa - pb).abs().max().item(),
            "mean_total_variation": 0.5 * (pa - pb).abs().sum(1).mean().item(),
            "max_prob": max(pa.max().item(), pb.max().item()),
            "logit_rel_diff": ((a - b).norm() / a.norm()).item()}


def _features(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The conv features the head pools: ``(B, 432, T, H, W)``."""
    for name in ("stem", "res2", "res3", "res4", "res5"):
        x = model._modules[name](x)
    head = model._modules["head"]._modules
    return head["act"](head["bn"](head["conv"](x)))


def predictions(windows: int, seed: int = 0) -> dict[str, Any]:
    """CoX3D-S over a stream against X3D-S clip by clip (random weights, smooth stream)."""
    torch.set_num_threads(max(1, torch.get_num_threads()))
    offline, continual = build(seed=seed)
    frame_scope = create_model("x3d_s", se_scope="frame", head_activation=None)
    frame_scope.load_state_dict(offline.state_dict())
    pad = 28  # temporal padding of the conv stack: frames of context on each side
    length = pad + windows + T - 1 + pad
    x = smooth_stream(length)
    with torch.inference_mode():
        streamed = continual(x)[0].T  # (windows + 2 pad, classes): the stepped outputs
        check = x[:, :, : continual.delay + 1 + 5]
        continual.reset_state()
        stepped = continual.forward_steps(check)[0].T
        continual.reset_state()
        exact = (stepped - continual(check)[0].T[: stepped.shape[0]]).abs().max().item()
        starts = range(pad, pad + windows)
        clip_se = torch.cat([offline(x[:, :, s: s + T])[:, :, 0] for s in starts])
        frame_se = torch.cat([frame_scope(x[:, :, s: s + T])[:, :, 0] for s in starts])
        feats = _features(continual, x)
        rel = torch.zeros(T)
        for s in starts:  # padding effect per frame position inside the clip
            f = _features(frame_scope, x[:, :, s: s + T])
            ref = feats[:, :, s: s + T]
            rel += ((f - ref).flatten(3).norm(dim=(1, 3)) /
                    ref.flatten(3).norm(dim=(1, 3)))[0] / windows
    ours = streamed[pad: pad + windows]
    return {"windows": windows, "stream_frames": length,
            "feature_rel_diff_by_position": rel.tolist(),
            "stepped_vs_offline_counterpart_max_abs": exact,
            "se_scope_only": _agreement(clip_se, frame_se),
            "padding_only": _agreement(frame_se, ours),
            "total": _agreement(clip_se, ours)}


def to_markdown(r: dict[str, Any]) -> str:
    m = r["machine"]
    lines = [
        "# X3D-S clip inference vs CoX3D-S stepping",
        "",
        f"Command: `{r['command']}`",
        "",
        f"Machine: {m['cpu']}, {m['cpus']} CPUs, torch {m['torch']}, Python {m['python']}; "
        f"load average at start {m['loadavg'][0]:.2f} (a shared machine: CPU times are the "
        f"steadier measure). Random weights; float32; batch 1; {r['elapsed_s']:.0f} s.",
        "",
        "## Latency per prediction",
        "",
        "X3D-S: one 13x160x160 clip per prediction. CoX3D-S: one `forward_step` per prediction "
        "(steady state). Interleaved repeats; medians [quartiles].",
        "",
        "| variant | threads | X3D-S wall (ms) | CoX3D-S wall (ms) | wall ratio | X3D-S CPU (ms) "
        "| CoX3D-S CPU (ms) | CPU ratio | target 8x |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for res in r["latency"]:
        w, c = res["wall"], res["cpu"]

        def cell(d: dict[str, float]) -> str:
            return f"{d['median_ms']:.1f} [{d['q1_ms']:.1f}, {d['q3_ms']:.1f}]"

        met = {(True, True): "met", (True, False): "wall only", (False, True): "CPU only",
               (False, False): "not met"}[(w["ratio"] >= 8, c["ratio"] >= 8)]
        lines.append(f"| {res['variant']} | {res['threads']} | {cell(w['x3d_s'])} | "
                     f"{cell(w['cox3d_s'])} | {w['ratio']:.2f}x | {cell(c['x3d_s'])} | "
                     f"{cell(c['cox3d_s'])} | {c['ratio']:.2f}x | {met} |")
    mac = r["macs"]
    lines += [
        "",
        "Of these CPU times, the kernel's share (page faults of freshly mapped activation "
        "buffers under glibc's default allocator, measured with `getrusage`): " + "; ".join(
            f"{res['variant']}: X3D-S {res['kernel_ms_per_prediction']['x3d_s']:.1f} ms, "
            f"CoX3D-S {res['kernel_ms_per_prediction']['cox3d_s']:.1f} ms (ratio of the "
            f"user-space CPU times {res['user_ratio']:.2f}x)"
            for res in r["latency"]) + ". The kernel's share varies between runs with the "
        "allocator's state and the machine's load, and with it the ratio.",
        "",
        f"MACs per prediction (ptflops convention): X3D-S {mac['x3d_s_clip_gmacs']:.3f} G, "
        f"CoX3D-S {mac['cox3d_s_step_gmacs']:.3f} G: {mac['reduction']:.1f}x fewer (paper: "
        "2.06 G vs 0.17 G, 12.1x; measured 5.9x on its CPU).",
        "",
        "## Peak memory",
        "",
        "Each model alone in a fresh process, one thread: the peak resident set size is reset "
        "after a warm-up and `malloc_trim` (`/proc/self/clear_refs`), then 5 predictions run. "
        "Peak: the process total (Python, torch, weights, caches; for CoX3D-S also its stream "
        "state); before: the resident size before inference; inference: the growth of the "
        "peak over it (transient activations).",
        "",
        "| variant | X3D-S peak (MB) | CoX3D-S peak (MB) | X3D-S before (MB) | CoX3D-S "
        "before (MB) | X3D-S inference (MB) | CoX3D-S inference (MB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for variant, mem in r["memory"].items():
        a, b = mem["x3d_s"], mem["cox3d_s"]
        lines.append(f"| {variant} | {a['peak_mb']:.1f} | {b['peak_mb']:.1f} | "
                     f"{a['before_mb']:.1f} | {b['before_mb']:.1f} | "
                     f"{a['inference_mb']:.1f} | {b['inference_mb']:.1f} |")
    p = r["predictions"]
    lines += [
        "",
        f"CoX3D-S stream state: {r['state_mb']:.1f} MB (partial sums, delay lines, pool windows).",
        "",
        "## CoX3D-S over a stream vs X3D-S clip by clip",
        "",
        f"A smooth random stream of {p['stream_frames']} frames; {p['windows']} windows of 13 "
        "frames, each with 28 frames of real context on both sides in the stream. CoX3D-S's "
        "stepped outputs equal its offline counterpart over the whole stream (max abs "
        f"difference {p['stepped_vs_offline_counterpart_max_abs']:.1e} on a check). "
        "`se_scope_only`: X3D-S (clip-scope SE) vs the same network with frame-scope SE, on the "
        "same clips; `padding_only`: frame-scope SE clip by clip (zero-padded clips) vs CoX3D-S "
        "(the stream's frames instead of padding); `total`: X3D-S clip by clip vs CoX3D-S. "
        "Random weights give nearly flat class probabilities (largest probability "
        f"{p['total']['max_prob']:.3f}), so top-1 agreement is a weak signal here; the relative "
        "logit difference is the robust one. Re-run with published weights for accuracy.",
        "",
        "| comparison | top-1 agreement | top-5 overlap | max abs prob diff | mean total "
        "variation | relative logit diff |",
        "|---|---|---|---|---|---|",
    ]
    for key in ("se_scope_only", "padding_only", "total"):
        a = p[key]
        lines.append(f"| {key} | {a['top1_agreement']:.1%} | {a['top5_overlap']:.1%} | "
                     f"{a['max_abs_prob_diff']:.2e} | {a['mean_total_variation']:.2e} | "
                     f"{a['logit_rel_diff']:.3f} |")
    rel = p["feature_rel_diff_by_position"]
    lines += [
        "",
        "Where padding matters: relative difference of the conv features the head pools "
        "(432 channels, per frame) between a zero-padded clip and the stream, by frame "
        "position in the clip (mean over windows):",
        "",
        "| position | " + " | ".join(str(i) for i in range(len(rel))) + " |",
        "|---|" + "---|" * len(rel),
        "| rel. diff | " + " | ".join(f"{v:.3f}" for v in rel) + " |",
    ]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=40, help="interleaved repeats")
    parser.add_argument("--threads", type=int, nargs="+", default=[1])
    parser.add_argument("--windows", type=int, default=24, help="clips compared")
    parser.add_argument("--fold-bn", action="store_true",
                        help="also measure both models with batch norms folded")
    parser.add_argument("--quick", action="store_true", help="smoke run (x3d_quick.*)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--memory-probe", choices=("x3d_s", "cox3d_s"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    args = parse_args(argv)
    if args.memory_probe:
        print(json.dumps(memory_probe(args.memory_probe, args.fold_bn)))
        return None
    raw = sys.argv[1:] if argv is None else argv
    t0 = time.perf_counter()
    repeats = 3 if args.quick else args.repeats
    report: dict[str, Any] = {
        "command": shlex.join(["python", "benchmarks/x3d.py", *raw]),
        "machine": {"cpu": cpu_model(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "python": platform.python_version(), "loadavg": os.getloadavg()},
        "macs": macs(), "latency": [], "memory": {},
    }
    variants = [False, True] if args.fold_bn else [False]
    for fold in variants:
        name = "BN folded (both)" if fold else "as published"
        offline, continual = build(fold)
        for threads in args.threads:
            res = latency(offline, continual, repeats, threads)
            res["variant"] = name
            report["latency"].append(res)
            print(f"[{name}, {threads} thr] wall {res['wall']['ratio']:.2f}x, "
                  f"CPU {res['cpu']['ratio']:.2f}x", flush=True)
        report["memory"][name] = memory(fold)
    _, continual = build()
    state = continual.init_state(1, (3, S, S))["tree"]
    report["state_mb"] = sum(t.numel() * t.element_size() for _, t in tree_leaves(state)) / 2**20
    report["predictions"] = predictions(6 if args.quick else args.windows)
    report["elapsed_s"] = time.perf_counter() - t0
    write_report(args.out, "x3d_quick" if args.quick else "x3d", report, to_markdown(report))
    return report


if __name__ == "__main__":
    main()
