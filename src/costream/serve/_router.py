"""The router: which replica holds which stream, micro-batching, snapshots, replay, failover.

Every operation of a stream goes to the replica that holds its state (the router keeps the
map). Each replica has one queue and one task that sends it the queued operations of all its
streams in one call, at most one call in flight, after a short window (or as soon as every
stream of the replica has a frame waiting). The replica steps them in rounds, one batched
engine step per round.

Nothing is lost when a replica dies. Per stream the router keeps the frames it delivered since
the replica's last snapshot (taken every ``snapshot_every_s`` seconds, returned with a step's
outputs). On a failed call the replica's streams move to the live replicas, each rebuilt from
its slot of that snapshot (or from a fresh state if it started after it) by replaying those
frames with their outputs dropped. The failed call's operations then run on the new replicas,
so each frame gets exactly one output. With a finite receptive field the log is capped: the last
``receptive_field`` frames (plus the warm-up, at the same phase of a strided network) replayed
from a fresh state rebuild the state, so a stream needs no snapshot. Scaling down drains a
replica the same way, from a snapshot taken at that moment.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from ._pool import ReplicaDied
from ._worker import Snapshot


@dataclass(eq=False)
class _Replica:
    handle: Any
    name: str
    queue: list = field(default_factory=list)
    streams: set = field(default_factory=set)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    more: asyncio.Event = field(default_factory=asyncio.Event)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    alive: bool = True
    draining: bool = False
    drained: asyncio.Event = field(default_factory=asyncio.Event)
    last_snapshot: float = field(default_factory=time.monotonic)
    task: asyncio.Task | None = None


@dataclass(eq=False)
class _Stream:
    key: str
    replica: _Replica
    opened: bool = False  # the replica has applied the open
    closing: bool = False
    acked: int = 0        # events (frames, resets) the replica has applied
    fresh_at: int = 0     # event count at which the state was last fresh (open or reset)
    snap: tuple[Snapshot, int, int] | None = None  # (snapshot, slot, events) the log follows
    log: deque = field(default_factory=deque)  # frames applied after snap / fresh_at
    trimmed: bool = False  # the log lost its oldest frames (finite receptive field)


class StreamRouter:
    """Route streams to replicas, batch their frames, and fail over without losing any.

    Args:
        pool: where replicas run (:class:`LocalPool` or :class:`RayPool`).
        replicas: number of replicas to start.
        batch_window_s: how long a replica's queue collects frames before a call.
        snapshot_every_s: seconds between a replica's snapshots (``None``: never; then the
            log of a stream is bounded only with ``receptive_field``).
        receptive_field, stride, warm_up: the network's temporal geometry; with a finite
            ``receptive_field`` a stream's log keeps at most ``max(receptive_field, warm_up
            + 1) + stride - 1`` frames.
        respawn: start a new replica when one dies.

    Example:
        >>> import asyncio, torch, costream as cs
        >>> from costream.serve import LocalPool, StreamRouter
        >>> async def demo():
        ...     pool = LocalPool(module=cs.Conv1d(2, 3, 2), capacity=8, frame_shape=(2,))
        ...     router = StreamRouter(pool, replicas=2)
        ...     await router.start()
        ...     a = await router.open()
        ...     outs = [await router.send(a, torch.ones(2)) for _ in range(3)]
        ...     await router.close(a)
        ...     await router.stop()
        ...     return [o is None for o in outs]
        >>> asyncio.run(demo())
        [True, False, False]
    """

    def __init__(self, pool: Any, replicas: int = 2, *, batch_window_s: float = 0.005,
                 snapshot_every_s: float | None = 1.0, receptive_field: int | None = None,
                 stride: int = 1, warm_up: int = 0, respawn: bool = True) -> None:
        if replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {replicas}")
        self.pool = pool
        self.n_replicas = replicas
        self.batch_window_s = batch_window_s
        self.snapshot_every_s = snapshot_every_s
        self.stride = stride
        self.min_replay = max(receptive_field or 0, warm_up + 1)
        self.log_cap = None if receptive_field is None else self.min_replay + stride - 1
        self.respawn = respawn
        self.replicas: list[_Replica] = []
        self.streams: dict[str, _Stream] = {}
        self.recoveries: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ replicas
    async def start(self) -> None:
        """Start the replicas."""
        await asyncio.gather(*[self._add_replica() for _ in range(self.n_replicas)])

    async def stop(self) -> None:
        """Stop the routing tasks (the replicas are left to the pool's owner)."""
        for r in self.replicas:
            r.alive = False
            if r.task is not None:
                r.task.cancel()

    async def _add_replica(self) -> _Replica:
        handle = await self.pool.spawn()
        r = _Replica(handle, self.pool.name(handle))
        r.task = asyncio.create_task(self._run(r))
        self.replicas.append(r)
        return r

    async def scale(self, replicas: int) -> None:
        """Add replicas, or drain the least loaded ones (their streams move, nothing lost)."""
        while len(self.replicas) < replicas:
            await self._add_replica()
        while len(self.replicas) > max(1, replicas):
            r = min(self.replicas, key=lambda r: len(r.streams))
            r.draining = True
            r.wake.set()
            await r.drained.wait()
        self.n_replicas = len(self.replicas)

    def kill(self, index: int) -> None:
        """Kill replica ``index`` (tests and drills: its streams move on the next call)."""
        self.pool.kill(self.replicas[index].handle)

    def placement(self) -> dict[str, str]:
        """Which replica holds each stream."""
        return {k: s.replica.name for k, s in self.streams.items()}

    # ------------------------------------------------------------------ streams
    async def open(self) -> str:
        """Open a stream on the least loaded replica; return its id."""
        live = [r for r in self.replicas if r.alive and not r.draining]
        if not live:
            raise RuntimeError("no live replica")
        r = min(live, key=lambda r: len(r.streams))
        key = uuid.uuid4().hex[:16]
        s = self.streams[key] = _Stream(key, r)
        r.streams.add(key)
        await self._submit(s, ("open", key))
        return key

    async def send(self, key: str, frame: Tensor) -> Tensor | None:
        """Step stream ``key`` by one frame; its output, or ``None`` when none is due."""
        return await self._submit(self._get(key), ("frame", key, frame))

    async def reset(self, key: str) -> None:
        """Restart stream ``key`` from a fresh state."""
        await self._submit(self._get(key), ("reset", key))

    async def close(self, key: str) -> None:
        """End stream ``key``."""
        s = self._get(key)
        s.closing = True
        await self._submit(s, ("close", key))

    def _get(self, key: str) -> _Stream:
        s = self.streams.get(key)
        if s is None or s.closing:
            raise KeyError(f"no open stream {key!r}")
        return s

    def _submit(self, s: _Stream, op: tuple) -> asyncio.Future:
        fut = asyncio.get_running_loop().create_future()
        r = s.replica
        r.queue.append((op, fut))
        r.more.set()
        r.wake.set()
        return fut

    # ------------------------------------------------------------------ the replica's task
    async def _run(self, r: _Replica) -> None:
        while r.alive:
            if r.draining:
                await self._drain(r)
                return
            await r.wake.wait()
            if r.draining:
                continue
            await self._collect(r)
            r.wake.clear()
            batch, r.queue = r.queue, []
            if not batch:
                continue
            due = (self.snapshot_every_s is not None
                   and time.monotonic() - r.last_snapshot >= self.snapshot_every_s)
            try:
                async with r.lock:
                    results, snap = await self.pool.call(r.handle, "apply",
                                                         [op for op, _ in batch], due)
            except ReplicaDied as err:
                await self._failover(r, batch, reason=str(err))
                return
            except Exception as err:  # not a death: every op of the call fails alike
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(err)
                continue
            self._ack(r, batch, results)
            if snap is not None:
                self._take_snapshot(r, snap)

    async def _collect(self, r: _Replica) -> None:
        """Wait up to the batch window for more frames, unless every stream has one."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.batch_window_s
        while r.alive and not r.draining:
            waiting = {op[1] for op, _ in r.queue}
            remaining = deadline - loop.time()
            if remaining <= 0 or len(waiting) >= len(r.streams):
                return
            r.more.clear()
            try:
                await asyncio.wait_for(r.more.wait(), remaining)
            except asyncio.TimeoutError:
                return

    def _ack(self, r: _Replica, batch: list, results: list) -> None:
        for (op, fut), result in zip(batch, results):
            kind, key = op[0], op[1]
            s = self.streams.get(key)
            if isinstance(result, Exception):
                if kind == "open" and s is not None:  # e.g. no free slot: forget the stream
                    del self.streams[key]
                    r.streams.discard(key)
                fut.set_exception(result)
                continue
            if kind == "open":
                s.opened = True
            elif kind == "frame":
                s.acked += 1
                s.log.append(op[2])
                if self.log_cap is not None and len(s.log) > self.log_cap:
                    s.log.popleft()
                    s.trimmed, s.snap = True, None
            elif kind == "reset":
                s.acked += 1
                s.fresh_at, s.snap, s.trimmed = s.acked, None, False
                s.log.clear()
            elif kind == "close":
                del self.streams[key]
                r.streams.discard(key)
            fut.set_result(result)

    def _take_snapshot(self, r: _Replica, snap: Snapshot) -> None:
        r.last_snapshot = time.monotonic()
        for key, (slot, events) in snap.streams.items():
            s = self.streams.get(key)
            if s is not None and s.replica is r and s.acked == events:
                s.snap, s.trimmed = (snap, slot, events), False
                s.log.clear()

    # ------------------------------------------------------------------ failover
    def _plan(self, s: _Stream) -> tuple[Snapshot | None, int | None, list[Tensor]]:
        """How to rebuild stream ``s``: (snapshot, slot, frames to replay)."""
        log = list(s.log)
        if s.snap is not None:
            return s.snap[0], s.snap[1], log
        if not s.trimmed:
            return None, None, log
        # finite receptive field: the last k frames from a fresh state, k >= min_replay and
        # at the stream's phase (k = frames since fresh, modulo the stride)
        k = len(log) - (len(log) - (s.acked - s.fresh_at)) % self.stride
        return None, None, log[len(log) - k:]

    async def _failover(self, r: _Replica, failed: list, reason: str,
                        respawn: bool = True) -> None:
        """Move the streams of dead replica ``r`` to the live ones and rerun ``failed``."""
        t0 = time.perf_counter()
        r.alive = False
        self.replicas.remove(r)
        try:  # an unreachable replica may still run: make sure it never answers again
            self.pool.kill(r.handle)
        except Exception:  # already gone
            pass
        if (respawn and self.respawn) or not self.replicas:
            spawn = asyncio.create_task(self._add_replica())
            if not self.replicas:
                await spawn
        moved = [self.streams[k] for k in sorted(r.streams)]
        rebuilt = [s for s in moved if s.opened]
        targets = await self._move(r, rebuilt, failed)
        self.recoveries.append({"replica": r.name, "reason": reason, "streams": len(moved),
                                "targets": targets, "seconds": time.perf_counter() - t0})

    async def _move(self, r: _Replica, rebuilt: list[_Stream], failed: list) -> list[str]:
        live = sorted((x for x in self.replicas if x.alive and not x.draining),
                      key=lambda x: x.name)
        load = {x: len(x.streams) for x in live}
        locks = [x.lock for x in live]
        for lock in locks:
            await lock.acquire()
        try:
            pending, r.queue = failed + r.queue, []
            where: dict[str, _Replica] = {}
            for key in sorted(r.streams):
                target = min(live, key=lambda x: load[x])
                load[target] += 1
                where[key] = target
                self.streams[key].replica = target
                target.streams.add(key)
            r.streams.clear()
            for target in live:  # the older operations go first
                mine = [item for item in pending if where.get(item[0][1]) is target]
                target.queue[:0] = mine
            for target in live:
                group = [s for s in rebuilt if where[s.key] is target]
                await self._adopt(target, group)
        finally:
            for lock in locks:
                lock.release()
        for target in live:
            target.wake.set()
        return sorted({x.name for x in where.values()})

    async def _adopt(self, target: _Replica, group: list[_Stream]) -> None:
        by_snap: dict[int, tuple[Snapshot | None, dict, dict]] = {}
        for s in group:
            snap, slot, replay = self._plan(s)
            entry = by_snap.setdefault(id(snap), (snap, {}, {}))
            entry[1][s.key] = (slot, s.acked)
            entry[2][s.key] = replay
        for snap, streams, replay in by_snap.values():
            try:
                await self.pool.call(target.handle, "adopt", snap, streams, replay)
            except ReplicaDied:
                return  # the target is dead too: its task fails over on its next call

    async def _drain(self, r: _Replica) -> None:
        """Scale-down: snapshot ``r`` now, move its streams (no replay needed), stop it."""
        try:
            async with r.lock:
                snap = await self.pool.call(r.handle, "snapshot")
            self._take_snapshot(r, snap)
        except ReplicaDied as err:
            await self._failover(r, [], reason=str(err), respawn=False)
            r.drained.set()
            return
        await self._failover(r, [], reason="drained", respawn=False)  # stops the replica
        r.drained.set()
