"""One serving replica: a :class:`~costream.runtime.StreamEngine` whose streams have names.

A replica receives ordered operations (open, frame, reset, close) of many streams in one call
and applies them in rounds: each round steps every stream that has its next frame in the call,
in one engine step (the engine groups strided networks by phase). It counts the events (frames
and resets) each stream has received, snapshots its streams in the stream-checkpoint format,
and adopts streams from another replica's snapshot (or from a fresh state), replaying frames
whose outputs were already delivered.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..core import tree_map
from ..core._module import CoModule
from ..runtime import StreamEngine, load_engine, save_engine

Op = tuple  # ("open", key) | ("frame", key, tensor) | ("reset", key) | ("close", key)


@dataclass
class Snapshot:
    """A replica's streams at one moment: the engine checkpoint (``data``: the file's bytes,
    or ``path`` when written to a directory) and, per stream, its slot and event count.

    Example:
        >>> import torch, costream as cs
        >>> from costream.serve import StreamWorker
        >>> w = StreamWorker(cs.Conv1d(2, 3, 2), capacity=2, frame_shape=(2,))
        >>> _ = w.apply([("open", "a"), ("frame", "a", torch.ones(2))])
        >>> snap = w.snapshot()
        >>> snap.streams, snap.read()[:16]
        ({'a': (0, 1)}, b'COSTREAM-STREAMS')
    """

    streams: dict[str, tuple[int, int]]
    data: bytes | None = None
    path: str | None = None
    taken_at: float = field(default_factory=time.time)

    def read(self) -> bytes:
        if self.data is not None:
            return self.data
        with open(self.path, "rb") as fh:  # type: ignore[arg-type]
            return fh.read()


class StreamWorker:
    """The streams of one replica (plain Python; Ray runs it as an actor).

    Args:
        module: the continual module (weights identical on every replica).
        capacity, frame_shape, dtype, max_batch: as for :class:`~costream.runtime.StreamEngine`.
        snapshot_dir: write snapshots into this directory instead of returning their bytes.
        threads: torch threads of this replica (``None``: leave as is).
        name: the replica's name (snapshot file names).

    Example:
        >>> import torch, costream as cs
        >>> from costream.serve import StreamWorker
        >>> w = StreamWorker(cs.Conv1d(2, 3, 2), capacity=4, frame_shape=(2,))
        >>> out, _ = w.apply([("open", "a"), ("frame", "a", torch.ones(2)),
        ...                   ("frame", "a", torch.ones(2))])
        >>> out[1] is None, out[2].shape, w.counts()
        (True, torch.Size([3]), {'a': 2})
    """

    def __init__(self, module: CoModule, capacity: int, frame_shape: tuple[int, ...], *,
                 dtype: torch.dtype | None = None, max_batch: int | None = None,
                 snapshot_dir: str | None = None, threads: int | None = None,
                 name: str = "replica") -> None:
        if threads:
            torch.set_num_threads(threads)
        self.module = module.eval()
        self._config = dict(capacity=capacity, frame_shape=tuple(frame_shape), dtype=dtype,
                            max_batch=max_batch)
        self.engine = StreamEngine(module, **self._config)
        self.slots: dict[str, int] = {}
        self.events: dict[str, int] = {}
        self.snapshot_dir = snapshot_dir
        self.name = name
        self._snapshots = 0

    def pid(self) -> int:
        """The replica's process id (to tell replicas apart)."""
        return os.getpid()

    def counts(self) -> dict[str, int]:
        """Events (frames and resets) each open stream has received."""
        return dict(self.events)

    # ------------------------------------------------------------------ operations
    def apply(self, ops: list[Op], snapshot: bool = False) -> tuple[list[Any], Snapshot | None]:
        """Apply ``ops`` in order; return one result per op (a frame's output or ``None``)
        and, with ``snapshot``, a snapshot taken after the last op.

        An op that fails (unknown stream, full engine) gives its exception object as result;
        the other ops are applied.
        """
        results: list[Any] = [None] * len(ops)
        round_: dict[str, tuple[int, Tensor]] = {}
        with torch.inference_mode():
            for i, op in enumerate(ops):
                kind, key = op[0], op[1]
                if key in round_:  # a stream's second op in this call: step the round first
                    self._step(round_, results)
                if kind == "frame":
                    if key not in self.slots:
                        results[i] = KeyError(f"no open stream {key!r}")
                    else:
                        round_[key] = (i, op[2])
                    continue
                try:
                    self._control(kind, key)
                except (KeyError, RuntimeError) as err:
                    results[i] = err
            self._step(round_, results)
        return results, (self.snapshot() if snapshot else None)

    def _control(self, kind: str, key: str) -> None:
        if kind == "open":
            if key in self.slots:
                raise KeyError(f"stream {key!r} is already open")
            self.slots[key] = self.engine.open()
            self.events[key] = 0
        elif key not in self.slots:
            raise KeyError(f"no open stream {key!r}")
        elif kind == "reset":
            self.engine.reset(self.slots[key])
            self.events[key] += 1
        elif kind == "close":
            self.engine.close(self.slots.pop(key))
            del self.events[key]
        else:
            raise KeyError(f"unknown operation {kind!r}")

    def _step(self, round_: dict[str, tuple[int, Tensor]], results: list[Any]) -> None:
        if not round_:
            return
        out = self.engine.step({self.slots[k]: f for k, (_, f) in round_.items()})
        for key, (i, _) in round_.items():
            y = out[self.slots[key]]
            results[i] = None if y is None else y.clone()
            self.events[key] += 1
        round_.clear()

    # ------------------------------------------------------------------ snapshots
    def snapshot(self) -> Snapshot:
        """The engine's streams in the stream-checkpoint format, with each stream's slot and
        event count."""
        streams = {k: (s, self.events[k]) for k, s in self.slots.items()}
        self._snapshots += 1
        if self.snapshot_dir is not None:
            os.makedirs(self.snapshot_dir, exist_ok=True)
            path = os.path.join(self.snapshot_dir, f"{self.name}-{self._snapshots % 2}.pt")
            save_engine(self.engine, path)  # two files in turn: the previous one stays whole
            return Snapshot(streams, path=path)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "snapshot.pt")
            save_engine(self.engine, path)
            with open(path, "rb") as fh:
                return Snapshot(streams, data=fh.read())

    def adopt(self, snapshot: Snapshot | None, streams: dict[str, tuple[int | None, int]],
              replay: dict[str, list[Tensor]]) -> None:
        """Take over ``streams`` (``{key: (slot in snapshot or None, events)}``): from their
        slot of ``snapshot``, or from a fresh state where the slot is ``None``; then step the
        ``replay`` frames of each (outputs dropped: they were delivered) and set its count."""
        taken = [k for k in streams if k in self.slots]
        if taken:
            raise KeyError(f"streams already open here: {taken}")
        free = [i for i, a in enumerate(self.engine.state_dict()["active"]) if not a]
        if len(free) < len(streams):
            raise RuntimeError(f"{len(streams)} streams to adopt, {len(free)} free slots")
        moved = {k: v for k, v in streams.items() if v[0] is not None}
        if moved:
            self._transplant(snapshot, moved)
        for key in streams:
            if key not in self.slots:
                self.slots[key] = self.engine.open()
        with torch.inference_mode():
            step = 0
            while True:
                due = {self.slots[k]: fs[step] for k, fs in replay.items() if step < len(fs)}
                if not due:
                    break
                self.engine.step(due)
                step += 1
        for key, (_, events) in streams.items():
            self.events[key] = events

    def _transplant(self, snapshot: Snapshot | None,
                    moved: dict[str, tuple[int | None, int]]) -> None:
        if snapshot is None:
            raise ValueError("streams to adopt from a slot need a snapshot")
        scratch = StreamEngine(self.module, **self._config)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "snapshot.pt")
            with open(path, "wb") as fh:
                fh.write(snapshot.read())
            load_engine(scratch, path)  # refuses a snapshot of another network
        src, dst = scratch.state_dict(), self.engine.state_dict()
        free = [i for i, a in enumerate(dst["active"]) if not a]
        pairs = list(zip((s for s, _ in moved.values()), free))
        src_idx = torch.tensor([s for s, _ in pairs], dtype=torch.long)
        dst_idx = torch.tensor([d for _, d in pairs], dtype=torch.long)
        tree = tree_map(lambda d, s: d.index_copy(0, dst_idx.to(d.device),
                                                  s.index_select(0, src_idx.to(s.device))),
                        dst["tree"], src["tree"])
        for s, d in pairs:
            dst["age"][d] = src["age"][s]
            dst["active"][d] = True
        self.engine.load_state_dict({"tree": tree, "age": dst["age"], "active": dst["active"]})
        for key, (_, d) in zip(moved, pairs):
            self.slots[key] = d
