"""Helpers shared by the benchmark scripts: machine load from /proc/stat, the machine's peak
GEMM rate and copy bandwidth, and report files."""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def cpu_ticks() -> tuple[int, int]:
    """(all, idle) CPU time of the machine in clock ticks, from /proc/stat."""
    with open("/proc/stat") as fh:
        v = [int(x) for x in fh.readline().split()[1:]]
    return sum(v), v[3] + v[4]


class OtherLoad:
    """CPUs kept busy by other processes since construction: the machine's busy CPU time
    (/proc/stat) minus this process's own, per second of wall time (``None`` where
    /proc/stat cannot be read)."""

    def __init__(self) -> None:
        self.start = _ticks_or_none()
        self.own = sum(os.times()[:4])
        self.wall = time.perf_counter()

    def others(self) -> float | None:
        end = _ticks_or_none()
        if self.start is None or end is None:
            return None
        busy_s = ((end[0] - end[1]) - (self.start[0] - self.start[1])) / os.sysconf("SC_CLK_TCK")
        own_s = sum(os.times()[:4]) - self.own
        return max(0.0, (busy_s - own_s) / (time.perf_counter() - self.wall))


def _ticks_or_none() -> tuple[int, int] | None:
    try:
        return cpu_ticks()
    except (OSError, ValueError, IndexError):
        return None


def busy_cpus(interval: float = 1.0) -> float:
    """CPUs busy (all processes) over ``interval`` seconds."""
    t0, i0 = cpu_ticks()
    time.sleep(interval)
    t1, i1 = cpu_ticks()
    return (os.cpu_count() or 1) * (1 - (i1 - i0) / max(1, t1 - t0))


def wait_idle(limit: float, threshold: float = 0.3) -> tuple[float, float]:
    """Wait up to ``limit`` seconds until at most ``threshold`` CPUs are busy (measured over
    2 s); return (seconds waited, CPUs busy at the end)."""
    start = time.perf_counter()
    busy = busy_cpus(2.0)
    while busy > threshold and time.perf_counter() - start < limit:
        busy = busy_cpus(2.0)
    return time.perf_counter() - start, busy


def machine(**versions: str) -> dict[str, Any]:
    """Machine facts recorded with a benchmark's results; ``versions`` adds package versions
    (in the order given, after torch's)."""
    import datetime as dt
    import platform

    import torch

    import costream
    from costream.bench._report import cpu_model

    return {"cpu_model": cpu_model(), "logical_cpus": os.cpu_count(), "torch": torch.__version__,
            **versions, "costream": costream.__version__, "python": platform.python_version(),
            "loadavg_at_start": os.getloadavg(),
            "date_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")}


def write_report(out: Path, stem: str, report: dict[str, Any], markdown: str) -> None:
    """Write ``out/stem.json`` and ``out/stem.md`` and say so."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / f"{stem}.md").write_text(markdown)
    print(f"wrote {out / (stem + '.json')} and {out / (stem + '.md')}")


def gemm_rate(size: int = 2048, repeats: int = 9) -> float:
    """Multiply-accumulates per second of a large float32 GEMM (``size x size/2`` times
    ``size/2 x size/2``) at the current thread count: the faster of the BLAS (``addmm``) and
    oneDNN's linear, each the median of ``repeats`` calls after 3 untimed ones. An upper bound
    on the rate at which any step can execute its MACs."""
    from costream.modules._onednn import ONEDNN_LINEAR

    k = n = size // 2
    a, b, c = torch.randn(size, k), torch.randn(k, n), torch.randn(n)
    bt = b.t().contiguous()
    kernels = [lambda: torch.addmm(c, a, b)]
    if ONEDNN_LINEAR is not None:
        kernels.append(lambda: ONEDNN_LINEAR(a, bt, c, "none", [], ""))
    best = 0.0
    with torch.inference_mode():
        for kernel in kernels:
            for _ in range(3):
                kernel()
            seconds = statistics.median(_seconds(kernel) for _ in range(repeats))
            best = max(best, size * k * n / seconds)
    return best


def peaks(threads: int, quick: bool) -> dict[str, float]:
    """Peak float32 GEMM rate (GMAC/s, :func:`gemm_rate`) and memory copy bandwidth (GB/s) at
    ``threads``."""
    torch.set_num_threads(threads)
    gemm = gemm_rate(512 if quick else 2048, 3 if quick else 9)
    size = (1 << 22) if quick else (1 << 25)  # float32 elements: 16 MiB / 128 MiB
    src, dst = torch.randn(size), torch.empty(size)
    bw = min(_seconds(lambda: dst.copy_(src)) for _ in range(3 if quick else 6))
    return {"gemm_gmacs": gemm / 1e9, "bandwidth_gbs": 2 * 4 * size / bw / 1e9}


def _seconds(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0
