"""The router and replicas in one process: affinity, batching, failover and drain are exact."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest
import torch

from costream.serve import LocalPool, StreamRouter

from ._scenario import NETS, Script, assert_same, drive, solo

pytestmark = pytest.mark.usefixtures("one_thread")


def _router(name: str, **options) -> tuple[StreamRouter, object]:
    build, shape = NETS[name]
    net = build()
    pool = LocalPool(module=net, capacity=40, frame_shape=shape, dtype=torch.float64)
    return StreamRouter(pool, **{"replicas": 2, "batch_window_s": 0.002, **options}), net


async def _run(router: StreamRouter, script: Script, on_tick=None):
    await router.start()
    try:
        return await drive(script, router.open, router.send, router.reset, router.close,
                           on_tick)
    finally:
        await router.stop()


@pytest.mark.parametrize("name", ["strided", "transformer"])
def test_many_streams_equal_solo_runs(name):
    router, net = _router(name)
    script = Script(16, 20, NETS[name][1], seed=1)
    seen: set[str] = set()

    async def watch(t):
        seen.update(router.placement().values())

    got = asyncio.run(_run(router, script, watch))
    assert assert_same(got, solo(net, script)) > 20
    assert len(seen) == 2  # both replicas held streams


@pytest.mark.parametrize(("name", "snapshot_every_s"),
                         [("strided", 0.0), ("strided", None), ("transformer", 0.0),
                          ("transformer", 1e9)])
def test_failover_loses_nothing(name, snapshot_every_s):
    """Kill a replica mid-run: from snapshots every call (0.0), from snapshots never taken
    but a log capped at the receptive field (None), or from a fresh state and the whole log
    (1e9: the first snapshot never comes)."""
    rf = NETS[name][0]().receptive_field if snapshot_every_s is None else None
    router, net = _router(name, snapshot_every_s=snapshot_every_s, receptive_field=rf,
                          stride=2 if name == "strided" else 1, warm_up=net_warm_up(name))
    script = Script(16, 24, NETS[name][1], seed=2)

    trimmed = []

    async def kill(t):
        if t in (12, 20):
            trimmed.append(sum(s.trimmed for s in router.streams.values()))
            if rf is not None:
                assert max(len(s.log) for s in router.streams.values()) == router.log_cap
            router.kill(0)

    got = asyncio.run(_run(router, script, kill))
    assert assert_same(got, solo(net, script)) > 20
    assert len(router.recoveries) == 2
    assert all(r["streams"] > 0 for r in router.recoveries)
    if rf is not None:  # rebuilt from the last frames, not from a snapshot
        assert trimmed[-1] >= 3


def net_warm_up(name: str) -> int:
    return NETS[name][0]()._total_delay()


def test_drain_on_scale_down_moves_streams_exactly():
    router, net = _router("strided", snapshot_every_s=None)
    script = Script(16, 20, (3,), seed=3)

    async def scale(t):
        if t == 8:
            await router.scale(1)
            assert len({*router.placement().values()}) == 1

    got = asyncio.run(_run(router, script, scale))
    assert_same(got, solo(net, script))
    assert [r["reason"] for r in router.recoveries] == ["drained"]


def test_unknown_stream_is_refused():
    router, _ = _router("strided")

    async def go():
        await router.start()
        try:
            with pytest.raises(KeyError, match="no open stream"):
                await router.send("nope", torch.zeros(3, dtype=torch.float64))
        finally:
            await router.stop()

    asyncio.run(go())


def test_import_costream_does_not_import_ray():
    code = "import sys, costream, costream.serve; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True)
    assert out.stdout.strip() == "False"


def test_serve_command_line_builds_the_config():
    import argparse

    from costream.serve._cli import add_arguments, config_from

    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args(["tcn", "--replicas", "3", "--frame-shape", "4,5",
                         "--snapshot-every", "0.5", "--batch-window-ms", "2"])
    config = config_from(args)
    assert (config.model, config.replicas, config.frame_shape) == ("tcn", 3, (4, 5))
    assert (config.snapshot_every_s, config.batch_window_ms) == (0.5, 2.0)


def test_a_full_replica_refuses_a_stream_and_forgets_it():
    build, shape = NETS["strided"]
    router = StreamRouter(LocalPool(module=build(), capacity=2, frame_shape=shape,
                                    dtype=torch.float64), replicas=1)

    async def go():
        await router.start()
        try:
            keys = [await router.open(), await router.open()]
            with pytest.raises(RuntimeError, match="slots are in use"):
                await router.open()
            assert sorted(router.streams) == sorted(keys)
            await router.close(keys[0])
            await router.open()  # the freed slot serves a new stream
        finally:
            await router.stop()

    asyncio.run(go())


def test_failover_from_snapshot_files(tmp_path):
    """Snapshots written to a directory (shared storage) instead of returned as bytes."""
    build, shape = NETS["strided"]
    net = build()
    pool = LocalPool(module=net, capacity=40, frame_shape=shape, dtype=torch.float64,
                     snapshot_dir=str(tmp_path))
    router = StreamRouter(pool, replicas=2, batch_window_s=0.002, snapshot_every_s=0.0)
    script = Script(12, 20, shape, seed=4)

    async def kill(t):
        if t == 12:
            snaps = [s.snap for s in router.streams.values() if s.snap is not None]
            assert snaps and all(x[0].path and x[0].data is None for x in snaps)
            router.kill(0)

    got = asyncio.run(_run(router, script, kill))
    assert assert_same(got, solo(net, script)) > 10
    assert len(router.recoveries) == 1
    assert sorted(p.name for p in tmp_path.iterdir())[:2] == ["replica-0-0.pt", "replica-0-1.pt"]
