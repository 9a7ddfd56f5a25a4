"""``costream serve MODEL``: deploy a model on a local Ray instance (or a cluster) and serve it;
``--bench`` instead drives it with a load generator and reports frames/s and latency."""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import time


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``serve`` subcommand's arguments."""
    p.add_argument("model", help="zoo or workload name, converted .pt file, or "
                                 "package.module:function")
    p.add_argument("--replicas", type=int, default=2, help="replicas (default 2)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    p.add_argument("--host", default="127.0.0.1", help="HTTP host (default 127.0.0.1)")
    p.add_argument("--address", default=None,
                   help="join this Ray cluster (e.g. auto or ray://head:10001) instead of "
                        "starting a local instance")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local Ray instance")
    p.add_argument("--capacity", type=int, default=64, help="stream slots per replica")
    p.add_argument("--frame-shape", default=None, help="C,H,W... (models without a native one)")
    p.add_argument("--dtype", choices=["float32", "float64"], default=None)
    p.add_argument("--max-batch", type=int, default=None, help="streams per engine call")
    p.add_argument("--batch-window-ms", type=float, default=5.0,
                   help="how long frames are collected for one call (default 5)")
    p.add_argument("--snapshot-every", type=float, default=1.0,
                   help="seconds between replica snapshots (default 1; 0: every call)")
    p.add_argument("--snapshot-dir", default=None, help="write snapshots here (shared storage)")
    p.add_argument("--replica-cpus", type=float, default=1.0, help="CPUs per replica")
    p.add_argument("--threads", type=int, default=1, help="torch threads per replica")
    p.add_argument("--bench", action="store_true", help="run the load generator and exit")
    p.add_argument("--streams", type=int, default=64, help="--bench: streams (default 64)")
    p.add_argument("--seconds", type=float, default=10.0, help="--bench: measured seconds")
    p.add_argument("--gateway", action="store_true",
                   help="--bench: one client sends all streams' frames per call")
    p.add_argument("--json", default=None, help="--bench: also write the report here")


def config_from(args: argparse.Namespace):
    """The :class:`~costream.serve.ServeConfig` of parsed arguments."""
    from ._app import ServeConfig

    shape = None
    if args.frame_shape:
        shape = tuple(int(d) for d in args.frame_shape.split(","))
    return ServeConfig(args.model, shape, replicas=args.replicas, capacity=args.capacity,
                       dtype=args.dtype, max_batch=args.max_batch,
                       batch_window_ms=args.batch_window_ms,
                       snapshot_every_s=args.snapshot_every, snapshot_dir=args.snapshot_dir,
                       replica_cpus=args.replica_cpus, threads=args.threads)


def bench(handle, streams: int, seconds: float, progress: bool = True,
          gateway: bool = False) -> dict:
    """Drive the deployed app behind ``handle`` with ``streams`` closed-loop streams (with
    ``gateway``, all streams' frames in one ``send_many`` call)."""
    import torch

    from ._load import generate_load

    info = handle.ready.remote().result()

    async def go():
        return await generate_load(
            lambda: handle.open.remote(), lambda k, f: handle.send.remote(k, f),
            lambda k: handle.close.remote(k), tuple(info["frame_shape"]), streams=streams,
            seconds=seconds, dtype=getattr(torch, info["dtype"]), progress=progress,
            stats=lambda: handle.stats.remote(),
            send_many=(lambda fs: handle.send_many.remote(fs)) if gateway else None)

    return asyncio.run(go())


def run(args: argparse.Namespace) -> int:
    """Run ``costream serve``."""
    try:
        from ray import serve

        from ._app import run_app
    except ImportError as err:
        raise SystemExit(f"costream serve needs the serve extra: pip install "
                         f"'costream[serve]' ({err})") from err
    handle = run_app(config_from(args), port=args.port, host=args.host, address=args.address,
                     num_cpus=args.num_cpus)
    try:
        if args.bench:
            report = bench(handle, args.streams, args.seconds, gateway=args.gateway)
            held = report["held"]["replicas"] if report["held"] else {}
            print(f"{args.model}: {report['frames_per_s']:.1f} frames/s, p50 "
                  f"{report['p50_ms']:.2f} ms, p99 {report['p99_ms']:.2f} ms per frame; "
                  f"{report['streams']} streams held as {held}")
            if args.json:
                with open(args.json, "w") as fh:
                    json.dump(report, fh, indent=2)
            return 0
        print(f"serving {args.model} with {args.replicas} replicas at "
              f"http://{args.host}:{args.port}/streams (Ctrl-C stops)", flush=True)
        signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt))
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return 0
    finally:
        serve.shutdown()
