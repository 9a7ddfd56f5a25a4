"""Serving benchmark: many streams through the Ray Serve app against the engine in-process.

    python benchmarks/serve.py            # full run: benchmarks/results/serve.*
    python benchmarks/serve.py --quick    # smoke run (writes serve_quick.*)

For each workload (``tcn``, ``cox3d_xs``) 64 closed-loop streams (each sends its next frame as
soon as the previous one is answered) run for ``--seconds`` after a warm-up:

* ``in-process``: one :class:`costream.runtime.StreamEngine` stepping all streams in one call
  per step (the ceiling a server can reach on one process); a frame's latency is its step.
* ``serve xN``: the costream Ray Serve app (``costream.serve``) with N replicas, driven through
  its Python handle by :func:`costream.serve._load.generate_load` (what
  ``costream serve --bench`` runs). Latency is from ``send`` to its answer. Failover state is
  the capped log (the last receptive-field frames per stream), without snapshots: CoX3D-XS
  holds 10 MB of state per stream, so 64 streams would snapshot 650 MB each time.
* ``serve xN, gateway``: the same app, but one client sends every stream's next frame in one
  ``send_many`` call (a gateway hosting many cameras): one Serve request per step instead of
  one per frame.

The ratio is served frames/s over in-process frames/s. Each row records the CPUs other
processes kept busy meanwhile (``/proc/stat``, this process's own CPU time subtracted; Ray's
processes count as others, so the serve rows include the replicas' own work).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from _common import OtherLoad, machine, write_report

from costream.bench import resolve_workload
from costream.runtime import StreamEngine
from costream.serve._load import percentile

RESULTS = Path(__file__).parent / "results"


def in_process(net, frame_shape, streams: int, seconds: float) -> dict[str, Any]:
    """All streams stepped together in one engine, one thread."""
    engine = StreamEngine(net, capacity=streams, frame_shape=frame_shape)
    ids = [engine.open() for _ in range(streams)]
    frames = torch.randn(8, *frame_shape)
    times: list[float] = []
    load = OtherLoad()
    with torch.inference_mode():
        for t in range(3):  # warm-up
            engine.step({i: frames[t % 8] for i in ids})
        end = time.perf_counter() + seconds
        t = 0
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            engine.step({i: frames[t % 8] for i in ids})
            times.append(time.perf_counter() - t0)
            t += 1
    ms = [x * 1e3 for x in times]
    return {"setup": "in-process", "frames_per_s": streams * len(times) / sum(times),
            "p50_ms": percentile(ms, 50), "p99_ms": percentile(ms, 99),
            "mean_ms": statistics.fmean(ms), "frames": streams * len(times),
            "other_cpus": load.others()}


def served(net, frame_shape, streams: int, seconds: float, replicas: int,
           name: str, gateway: bool, kill_after_s: float | None = None) -> dict[str, Any]:
    import threading

    import ray
    from ray import serve

    from costream.serve import ServeConfig, build_app
    from costream.serve._app import NAMESPACE
    from costream.serve._cli import bench

    config = ServeConfig(net, frame_shape, replicas=replicas, capacity=streams,
                         replica_cpus=0.5, threads=1, batch_window_ms=5.0,
                         snapshot_every_s=None, capped_log=True)
    handle = serve.run(build_app(config), name=name, route_prefix=f"/{name}")
    victim = handle.ready.remote().result(timeout_s=300)["replicas"][0]
    if kill_after_s is not None:  # a failover drill: kill a replica's actor under load
        threading.Timer(kill_after_s, lambda: ray.kill(
            ray.get_actor(victim, namespace=NAMESPACE), no_restart=True)).start()
    load = OtherLoad()
    report = bench(handle, streams, seconds, progress=True, gateway=gateway)
    others = load.others()
    recoveries = handle.stats.remote().result()["recoveries"]
    serve.delete(name)
    held = report["held"] or {}
    setup = f"serve x{replicas}" + (", gateway" if gateway else "")
    if kill_after_s is not None:
        setup += f", replica killed at {kill_after_s:.0f} s"
    return {"setup": setup, "frames_per_s": report["frames_per_s"],
            "p50_ms": report["p50_ms"], "p99_ms": report["p99_ms"],
            "mean_ms": report["mean_ms"], "frames": report["frames"],
            "streams_held": held.get("replicas"), "other_cpus": others,
            "recoveries": [{"streams": r["streams"], "seconds": r["seconds"]}
                           for r in recoveries]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workloads", nargs="+", default=["tcn", "cox3d_xs"])
    p.add_argument("--streams", type=int, default=64)
    p.add_argument("--seconds", type=float, default=15.0)
    p.add_argument("--replicas", type=int, nargs="+", default=[1, 2])
    p.add_argument("--quick", action="store_true", help="tcn, 8 streams, 3 s, 1 replica")
    p.add_argument("--drill", action="store_true",
                   help="only the failover drill (2 replicas, gateway, one killed mid-run); "
                        "its rows are added to serve.json")
    p.add_argument("--render", action="store_true",
                   help="only rewrite serve.md from serve.json (no measurement)")
    args = p.parse_args()
    if args.render:
        report = json.loads((RESULTS / "serve.json").read_text())
        (RESULTS / "serve.md").write_text(render(report))
        return
    if args.quick:
        args.workloads, args.streams, args.seconds, args.replicas = ["tcn"], 8, 3.0, [1]
    torch.set_num_threads(1)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from ray import serve

    from costream.serve._app import init_ray

    facts = machine(ray=ray.__version__)
    init_ray(num_cpus=os.cpu_count())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    rows = []
    try:
        if args.drill:
            drills = []
            for spec in args.workloads:
                w = resolve_workload(spec)
                row = served(w.net.eval(), w.frame_shape, args.streams, args.seconds, 2,
                             f"{spec}-drill", True, kill_after_s=1.0 + args.seconds / 3)
                drills.append({"workload": spec, **row})
                print(drills[-1], flush=True)
            report = json.loads((RESULTS / "serve.json").read_text())
            report["drills"] = {"machine": facts, "seconds": args.seconds, "rows": drills}
            write_report(RESULTS, "serve", report, render(report))
            return
        for spec in args.workloads:
            w = resolve_workload(spec)
            net = w.net.eval()
            base = in_process(net, w.frame_shape, args.streams, args.seconds)
            rows.append({"workload": spec, **base, "ratio": 1.0})
            print(rows[-1], flush=True)
            for n in args.replicas:
                for gateway in (False, True):
                    row = served(net, w.frame_shape, args.streams, args.seconds, n,
                                 f"{spec}-{n}-{int(gateway)}", gateway)
                    row["ratio"] = row["frames_per_s"] / base["frames_per_s"]
                    rows.append({"workload": spec, **row})
                    print(rows[-1], flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    report = {"machine": facts, "streams": args.streams, "seconds": args.seconds,
              "quick": args.quick, "rows": rows}
    stem = "serve_quick" if args.quick else "serve"
    write_report(RESULTS, stem, report, render(report))


def render(report: dict[str, Any]) -> str:
    """The Markdown page of a report."""
    facts, rows = report["machine"], report["rows"]
    quick = " --quick" if report.get("quick") else ""
    lines = [f"# Serving {report['streams']} streams: Ray Serve app vs the engine in-process",
             "",
             f"{facts['cpu_model']}, {facts['logical_cpus']} logical CPUs, torch "
             f"{facts['torch']}, ray {facts['ray']}, {facts['date_utc']} UTC. One torch thread "
             "per replica; batch window 5 ms; failover by the capped log (no snapshots). "
             f"{report['seconds']:.0f} s measured per row. Command: "
             f"`python benchmarks/serve.py{quick}`.", "",
             "| workload | setup | frames/s | p50 ms | p99 ms | vs in-process | streams held "
             "| other CPUs busy |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        held = ", ".join(f"{v}" for v in (r.get("streams_held") or {}).values()) or "-"
        other = "?" if r["other_cpus"] is None else f"{r['other_cpus']:.2f}"
        lines.append(f"| {r['workload']} | {r['setup']} | {r['frames_per_s']:.1f} | "
                     f"{r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['ratio']:.2f} | {held} | "
                     f"{other} |")
    load = facts["loadavg_at_start"]
    lines += ["", f"The machine was shared: its load average was {load[0]:.1f} (1 min) when "
              "the run started, and other processes kept the CPUs busy as the last column "
              "shows (out of 2). For the serve rows that column also counts the app's own "
              "processes (ingress, replicas, Serve's proxy and controller), which run outside "
              "the benchmark's process. The ratios are therefore rough; rerun on a quiet "
              "machine before planning capacity from them.", "",
              "`serve xN` sends one Serve request per frame (64 closed-loop clients); "
              "`gateway` sends every stream's frame in one `send_many` request per step."]
    if "drills" in report:
        d = report["drills"]
        when, load = d["machine"]["date_utc"], d["machine"]["loadavg_at_start"][0]
        lines += ["", "## Failover drill", "",
                  f"{when} UTC, load average {load:.1f} at the start. Command: "
                  "`python benchmarks/serve.py --drill`. 2 replicas, "
                  f"{report['streams']} streams through `send_many`; one replica's actor is "
                  "killed (`ray.kill`) a third into the run. Every frame was answered (a lost "
                  "frame fails the run); the outputs are not compared here (the tests do). "
                  "Recovery: from the failed call to the streams rebuilt on the survivor by "
                  "replaying their capped logs: each stream replays the frames it sent since "
                  "it opened, at most its log cap. A slow network has sent few frames by the "
                  "kill, so its row measures a short replay.", "",
                  "| workload | frames/s | p50 ms | p99 ms | streams moved | recovery s |",
                  "|---|---|---|---|---|---|"]
        for r in d["rows"]:
            rec = r["recoveries"][0] if r["recoveries"] else {"streams": 0, "seconds": 0.0}
            lines.append(f"| {r['workload']} | {r['frames_per_s']:.1f} | {r['p50_ms']:.2f} | "
                         f"{r['p99_ms']:.2f} | {rec['streams']} | {rec['seconds']:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
