"""Compiled vs eager stepping on the CPU: is ``compile_step`` worth taking?

For the ``costream bench`` workloads ``tcn``, ``transformer`` (2 layers) and ``cox3d_s``, at
batch 1 and float32 under ``torch.inference_mode()``, the script times side by side
(interleaved blocks, order rotating; medians over all timed steps):

* ``eager``: ``forward_step`` (the layers' steady-state paths);
* ``eager stride step``: the eager stride step (what ``compile_step`` returns
  on a CPU without ``force``);
* ``compiled, freezing option``: ``compile_step(net, force=True, options={"freezing":
  True})`` (inductor asked to fold the weights into the graph as constants; in this setup the
  compiled step still reads the live weights: after an in-place change of the weights it
  gives other outputs without recompiling, so nothing was frozen);
* ``compiled``: ``compile_step(net, force=True)`` (inductor).

Outputs of the compiled steps are compared with eager stepping over the warm-up first. The
result decides ``compile_step``'s CPU fallback (see its docstring).

Usage::

    python benchmarks/compiled_step.py                 # writes compiled_step.{json,md}
    python benchmarks/compiled_step.py --quick         # TCN only, few steps (compiled_step_quick.*)
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
from _common import OtherLoad, machine, write_report

from costream.bench._workloads import resolve_workload
from costream.runtime import compile_step
from costream.runtime._backends import EagerStep

VARIANTS = ("eager", "eager stride step", "compiled, freezing option", "compiled")


def measure(name: str, threads: int, repeats: int, block: int) -> dict[str, Any]:
    torch.set_num_threads(threads)
    torch._dynamo.reset()
    w = resolve_workload(name)
    net = w.net.eval()
    s, shape = net.temporal.stride, w.frame_shape
    warm = net.temporal.delay // s + 3  # so that several outputs are compared
    clips = [torch.randn(1, shape[0], s, *shape[1:]) for _ in range(warm + 4)]
    steps = {"eager stride step": EagerStep(net),
             "compiled, freezing option": compile_step(net, force=True,
                                                       options={"freezing": True}),
             "compiled": compile_step(net, force=True)}
    states = {k: net.init_state(1, shape) for k in steps}
    res: dict[str, Any] = {"workload": name, "threads": threads, "stride": s,
                           "compile_s": {}, "max_abs_diff": {}}
    with torch.inference_mode():
        net.reset_state()
        for k, step in steps.items():  # the first call compiles
            t0 = time.perf_counter()
            _, states[k] = step(clips[0], states[k])
            res["compile_s"][k] = time.perf_counter() - t0
        for clip in clips[1:]:
            ys = {}
            for k, step in steps.items():
                ys[k], states[k] = step(clip, states[k])
            for t in range(s):
                y = net.forward_step(clip[:, :, t])
            for k, v in ys.items():  # once due (before: warm-up filler, eager None)
                res["max_abs_diff"][k] = max(res["max_abs_diff"].get(k, 0.0),
                                             0.0 if y is None else float((v - y).abs().max()))

        def stepper(k: str):
            if k == "eager":
                return lambda x: [net.forward_step(x[:, :, t]) for t in range(s)]

            def go(x: torch.Tensor) -> None:
                _, states[k] = steps[k](x, states[k])

            return go

        run = {k: stepper(k) for k in VARIANTS}
        samples: dict[str, list[int]] = {k: [] for k in VARIANTS}
        meter = OtherLoad()
        x = clips[-1]
        for r in range(repeats):
            for j in range(len(VARIANTS)):
                k = VARIANTS[(r + j) % len(VARIANTS)]
                run[k](x)  # untimed: its own weights back in cache
                for _ in range(block):
                    t0 = time.perf_counter_ns()
                    run[k](x)
                    samples[k].append(time.perf_counter_ns() - t0)
    res["step_ms"] = {k: statistics.median(v) / 1e6 for k, v in samples.items()}
    res["compiled_over_eager"] = {k: res["step_ms"][k] / res["step_ms"]["eager"]
                                  for k in VARIANTS}
    res["other_processes_cpus"] = meter.others()
    res["steps_timed"] = len(samples["eager"])
    net.reset_state()
    torch._dynamo.reset()
    return res


def to_markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = ["# Compiled vs eager stepping on the CPU", "",
             f"Command: `{report['command']}`", "",
             f"Machine: {m['cpu_model']}, {m['logical_cpus']} logical CPUs; torch {m['torch']}, "
             f"costream {m['costream']}; {m['date_utc']} UTC. Batch 1, float32, "
             "`torch.inference_mode()`. Milliseconds per step (stride frames), medians of "
             "interleaved blocks; in brackets the time relative to eager `forward_step`. "
             "Other load: CPUs kept busy by other processes during the timing.", "",
             "| workload | threads | " + " | ".join(VARIANTS) + " | compile s (freezing "
             "option / not) | max abs diff (freezing option / not) | other load |",
             "|---|---|" + "---|" * len(VARIANTS) + "---|---|---|"]
    for r in report["results"]:
        cells = " | ".join(f"{r['step_ms'][k]:.3f} ({r['compiled_over_eager'][k]:.2f})"
                           for k in VARIANTS)
        c, d = r["compile_s"], r["max_abs_diff"]
        lines.append(f"| {r['workload']} | {r['threads']} | {cells} | "
                     f"{c['compiled, freezing option']:.0f} / {c['compiled']:.0f} | "
                     f"{d['compiled, freezing option']:.1e} / {d['compiled']:.1e} | "
                     f"{r['other_processes_cpus'] or 0:.2f} |")
    slower = [r["workload"] for r in report["results"]
              if min(r["step_ms"]["compiled, freezing option"], r["step_ms"]["compiled"])
              > r["step_ms"]["eager"]]
    lines += ["", ("Compiled steps slower than eager for: " + ", ".join(slower) +
                   ". `compile_step` therefore runs the eager step on a CPU unless "
                   "`force=True`.") if slower else
              "Compiled steps at least as fast as eager for every workload.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workloads", nargs="+", default=["tcn", "transformer", "cox3d_s"])
    p.add_argument("--threads", type=int, nargs="+", default=[1])
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--quick", action="store_true", help="TCN, 2 repeats of 2 steps")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = p.parse_args(argv)
    raw = sys.argv[1:] if argv is None else argv
    names = ["tcn"] if args.quick else args.workloads
    report: dict[str, Any] = {"command": shlex.join(["python", "benchmarks/compiled_step.py",
                                                     *raw]), "machine": machine(),
                              "results": []}
    for t in args.threads:
        for name in names:
            res = measure(name, t, 2 if args.quick else args.repeats, 2 if args.quick else 5)
            report["results"].append(res)
            print(f"[{name}, {t} thr] " + ", ".join(
                f"{k} {v:.3f} ms" for k, v in res["step_ms"].items()), flush=True)
    write_report(args.out, "compiled_step_quick" if args.quick else "compiled_step", report,
                 to_markdown(report))
    return report


if __name__ == "__main__":
    main()
