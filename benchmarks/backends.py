"""Step backends side by side: eager PyTorch, onnxruntime and OpenVINO on the bench workloads.

For ``tcn``, ``transformer`` (2 layers) and ``cox3d_s`` of ``costream bench``, at batch 1,
float32, each backend of :func:`costream.runtime.make_step` first steps a random stream of
twice the receptive field from a fresh state next to eager ``step_stride``: the largest
difference of the due outputs is reported (the backends must match eager to 1e-4). Then the
steps are timed interleaved (blocks of steps, order rotating; medians). The MACs of one eager
step (``FlopCounterMode``) over the peak GEMM rate measured in the same run give the compute
floor of the step, and eager time / floor the largest speed-up over eager any backend could
give (ceiling).

Usage::

    python benchmarks/backends.py                 # writes backends.{json,md}
    python benchmarks/backends.py --quick         # tcn, few steps (backends_quick.*)
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from _common import OtherLoad, machine, peaks, write_report
from torch.utils._python_dispatch import TorchDispatchMode
from transformer import counted_macs

from costream.bench._workloads import resolve_workload
from costream.runtime import make_step

BACKENDS = ("eager", "onnxruntime", "openvino")


class OperatorTraffic(TorchDispatchMode):
    """Operators that compute (views and reshapes left out) and the bytes of their tensor
    inputs and outputs, each counted once per operator: how much a step hands from one
    operator to the next, whatever the caches absorb."""

    VIEWS = frozenset({"alias", "as_strided", "chunk", "detach", "expand", "narrow", "permute",
                       "reshape", "_reshape_alias", "select", "slice", "split", "squeeze",
                       "t", "transpose", "unbind", "unflatten", "unsqueeze", "view",
                       "_unsafe_view"})

    def __init__(self) -> None:
        super().__init__()
        self.operators, self.bytes = 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.__name__.split(".")[0] not in self.VIEWS:
            outs = out if isinstance(out, (tuple, list)) else (out,)
            self.operators += 1
            self.bytes += sum(t.numel() * t.element_size()
                              for t in (*args, *(kwargs or {}).values(), *outs)
                              if isinstance(t, torch.Tensor))
        return out


def measure(name: str, threads: int, repeats: int, block: int,
            peak_gemm_gmacs: float) -> dict[str, Any]:
    torch.set_num_threads(threads)
    w = resolve_workload(name)
    net, shape = w.net.eval(), w.frame_shape
    s = net.temporal.stride
    res: dict[str, Any] = {"workload": name, "threads": threads, "stride": s,
                           "setup_s": {}, "max_abs_diff": {}}
    steps = {}
    for b in BACKENDS:
        t0 = time.perf_counter()
        steps[b] = make_step(net, b, frame_shape=shape, threads=threads)
        res["setup_s"][b] = time.perf_counter() - t0
    calls = -(-2 * net.temporal.receptive_field // s)
    gen = torch.Generator().manual_seed(0)
    states = {b: net.init_state(1, shape) for b in BACKENDS}
    ref = net.init_state(1, shape)
    with torch.inference_mode():
        for _ in range(calls):  # twice the receptive field, from a fresh state
            x = torch.randn(1, shape[0], s, *shape[1:], generator=gen)
            y_ref, ref = net.step_stride(x, ref)
            for b in BACKENDS:
                y, states[b] = steps[b](x, states[b])
                if bool(net.ready(ref).all()):
                    res["max_abs_diff"][b] = max(res["max_abs_diff"].get(b, 0.0),
                                                 float((y - y_ref).abs().max()))
        res["outputs_compared"] = calls - net.temporal.delay // s
        res["macs_per_step"] = counted_macs(lambda: net.step_stride(x, ref))["total"]
        with OperatorTraffic() as traffic:
            net.step_stride(x, ref)
        res["operators_per_step"], res["operator_bytes_per_step"] = traffic.operators, traffic.bytes
        samples: dict[str, list[int]] = {b: [] for b in BACKENDS}
        meter = OtherLoad()
        for r in range(repeats):
            for j in range(len(BACKENDS)):
                b = BACKENDS[(r + j) % len(BACKENDS)]
                _, states[b] = steps[b](x, states[b])  # untimed: its weights back in cache
                for _ in range(block):
                    t0 = time.perf_counter_ns()
                    _, states[b] = steps[b](x, states[b])
                    samples[b].append(time.perf_counter_ns() - t0)
    res["step_ms"] = {b: statistics.median(v) / 1e6 for b, v in samples.items()}
    res["speedup_over_eager"] = {b: res["step_ms"]["eager"] / v
                                 for b, v in res["step_ms"].items()}
    res["other_processes_cpus"] = meter.others()
    res["peak_gemm_gmacs"] = peak_gemm_gmacs
    res["compute_floor_ms"] = res["macs_per_step"] / (res["peak_gemm_gmacs"] * 1e6)
    res["eager_gmacs"] = res["macs_per_step"] / (res["step_ms"]["eager"] * 1e6)
    res["ceiling_over_eager"] = res["step_ms"]["eager"] / res["compute_floor_ms"]
    return res


def to_markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = ["# Step backends: eager vs onnxruntime vs OpenVINO", "",
             f"Command: `{report['command']}`", "",
             f"Machine: {m['cpu_model']}, {m['logical_cpus']} logical CPUs; torch "
             f"{m['torch']}, onnxruntime {m['onnxruntime']}, OpenVINO {m['openvino']}, "
             f"costream {m['costream']}; {m['date_utc']} UTC. Batch 1, float32. Milliseconds "
             "per stride step, medians of interleaved blocks; in brackets the speed-up over "
             "eager. Max abs diff: due outputs against eager `step_stride` over twice the "
             "receptive field from a fresh state. Other load: CPUs kept busy by other "
             "processes during the timing. MACs: one eager step (`FlopCounterMode`); floor: MACs "
             "/ the peak float32 GEMM rate measured in the same run at that thread count; "
             "ceiling: eager / floor, the largest speed-up over eager any backend could reach "
             "without doing less arithmetic. Operators: those of one eager step that compute "
             "(views left out); MB: the bytes of their inputs and outputs, each counted once per "
             "operator.", "",
             "| workload | threads | " + " | ".join(BACKENDS) + " | max abs diff (ORT / OV) | "
             "outputs compared | MACs per step | eager GMAC/s (peak) | floor ms | ceiling | "
             "operators (MB) | other load |",
             "|---|---|" + "---|" * len(BACKENDS) + "---|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        cells = " | ".join(f"{r['step_ms'][b]:.3f} ({r['speedup_over_eager'][b]:.2f}x)"
                           for b in BACKENDS)
        d = r["max_abs_diff"]
        lines.append(f"| {r['workload']} | {r['threads']} | {cells} | "
                     f"{d['onnxruntime']:.1e} / {d['openvino']:.1e} | "
                     f"{r['outputs_compared']} | {r['macs_per_step'] / 1e6:.2f} M | "
                     f"{r['eager_gmacs']:.1f} ({r['peak_gemm_gmacs']:.1f}) | "
                     f"{r['compute_floor_ms']:.3f} | {r['ceiling_over_eager']:.2f}x | "
                     f"{r['operators_per_step']} ({r['operator_bytes_per_step'] / 1e6:.1f}) | "
                     f"{r['other_processes_cpus'] or 0:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import onnxruntime
    import openvino

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workloads", nargs="+", default=["tcn", "transformer", "cox3d_s"])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--quick", action="store_true", help="tcn, 1 thread, 2 repeats")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = p.parse_args(argv)
    raw = sys.argv[1:] if argv is None else argv
    report: dict[str, Any] = {
        "command": shlex.join(["python", "benchmarks/backends.py", *raw]),
        "machine": machine(onnxruntime=onnxruntime.__version__,
                           openvino=openvino.__version__.split("-")[0]), "results": []}
    for t in [1] if args.quick else args.threads:
        peak = peaks(t, args.quick)["gemm_gmacs"]  # once per thread count
        for name in ["tcn"] if args.quick else args.workloads:
            res = measure(name, t, 2 if args.quick else args.repeats, 2 if args.quick else 5,
                          peak)
            report["results"].append(res)
            print(f"[{name}, {t} thr] " + ", ".join(
                f"{b} {v:.3f} ms" for b, v in res["step_ms"].items())
                + f"; max abs diff {res['max_abs_diff']}", flush=True)
    write_report(args.out, "backends_quick" if args.quick else "backends", report,
                 to_markdown(report))
    return report


if __name__ == "__main__":
    main()
