"""A load generator: many streams, each sending its next frame as soon as the previous one is
answered, for a fixed time; frames/s, p50/p99 latency per frame, streams held."""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import torch


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (nearest rank) of ``values``.

    Example:
        >>> from costream.serve._load import percentile
        >>> percentile([4.0, 1.0, 3.0, 2.0], 50), percentile(list(range(101)), 99)
        (2.0, 99)
    """
    ranked = sorted(values)
    rank = int(-(-len(ranked) * q // 100))  # ceil(n * q / 100)
    return ranked[max(0, min(len(ranked), rank) - 1)]


async def generate_load(open_: Callable[[], Awaitable[Any]],
                        send: Callable[[Any, torch.Tensor], Awaitable[Any]],
                        close: Callable[[Any], Awaitable[Any]], frame_shape: tuple[int, ...], *,
                        streams: int = 64, seconds: float = 10.0, warm_up_s: float = 1.0,
                        dtype: torch.dtype = torch.float32, progress: bool = True,
                        stats: Callable[[], Awaitable[dict[str, Any]]] | None = None,
                        send_many: Callable[[dict], Awaitable[Any]] | None = None
                        ) -> dict[str, Any]:
    """Run ``streams`` closed-loop streams for ``warm_up_s + seconds``; measure the last
    ``seconds``. Returns frames/s, latency percentiles (ms), frames, streams and stats.

    With ``send_many`` one client sends every stream's next frame in one call (a gateway),
    as soon as the previous call is answered; each frame's latency is its call's."""
    keys = await asyncio.gather(*[open_() for _ in range(streams)])
    frames = torch.randn(8, *frame_shape, dtype=dtype)
    latencies: list[float] = []
    t_start = time.perf_counter()
    t_measure, t_end = t_start + warm_up_s, t_start + warm_up_s + seconds

    async def one(key: Any, i: int) -> None:
        n = i
        while time.perf_counter() < t_end:
            t0 = time.perf_counter()
            await send(key, frames[n % len(frames)])
            t1 = time.perf_counter()
            if t0 >= t_measure:
                latencies.append(t1 - t0)
            n += 1

    async def show() -> None:
        while time.perf_counter() < t_end:
            await asyncio.sleep(1.0)
            now = time.perf_counter()
            if progress and now > t_measure:
                rate = len(latencies) / (now - t_measure)
                sys.stderr.write(f"\r{now - t_start:5.1f} s  {len(latencies):8d} frames  "
                                 f"{rate:9.1f} frames/s  {streams} streams")
                sys.stderr.flush()

    async def gateway() -> None:
        n = 0
        while time.perf_counter() < t_end:
            t0 = time.perf_counter()
            await send_many({k: frames[(n + i) % len(frames)] for i, k in enumerate(keys)})
            t1 = time.perf_counter()
            if t0 >= t_measure:
                latencies.extend([t1 - t0] * len(keys))
            n += 1

    clients = [gateway()] if send_many is not None else [one(k, i) for i, k in enumerate(keys)]
    await asyncio.gather(show(), *clients)
    if progress:
        sys.stderr.write("\n")
    held = await stats() if stats is not None else None
    await asyncio.gather(*[close(k) for k in keys])
    ms = [x * 1e3 for x in latencies] or [float("nan")]
    return {"streams": streams, "seconds": seconds, "frames": len(latencies),
            "frames_per_s": len(latencies) / seconds, "p50_ms": percentile(ms, 50),
            "p99_ms": percentile(ms, 99), "mean_ms": statistics.fmean(ms), "held": held}
