"""Where replicas run: in this process (tests, examples) or as Ray actors.

A pool starts replicas, calls their methods asynchronously, and turns a dead replica's failure
into :class:`ReplicaDied`, which the router answers with failover.
"""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

from ._worker import StreamWorker


class ReplicaDied(RuntimeError):
    """The replica's process is gone (killed, crashed, or drained and stopped).

    Example:
        >>> from costream.serve import ReplicaDied
        >>> issubclass(ReplicaDied, RuntimeError)
        True
    """


class LocalPool:
    """Replicas as objects of this process; :meth:`kill` makes one fail as a dead actor would.

    Args:
        **worker_args: passed to :class:`StreamWorker` (``module``, ``capacity``, ...).

    Example:
        >>> import asyncio, torch, costream as cs
        >>> from costream.serve import LocalPool, ReplicaDied
        >>> pool = LocalPool(module=cs.Conv1d(2, 3, 2), capacity=2, frame_shape=(2,))
        >>> replica = asyncio.run(pool.spawn())
        >>> pool.kill(replica)
        >>> try:
        ...     asyncio.run(pool.call(replica, "counts"))
        ... except ReplicaDied as err:
        ...     print(err)
        replica 0 is dead
    """

    def __init__(self, **worker_args: Any) -> None:
        self.worker_args = worker_args
        self._ids = itertools.count()
        self.dead: set[int] = set()

    async def spawn(self) -> Any:
        wid = next(self._ids)
        w = StreamWorker(name=f"replica-{wid}", **self.worker_args)
        w.id = wid
        return w

    async def call(self, replica: Any, method: str, *args: Any) -> Any:
        if replica.id in self.dead:
            raise ReplicaDied(f"replica {replica.id} is dead")
        await asyncio.sleep(0)  # yield as a remote call would
        result = getattr(replica, method)(*args)
        if replica.id in self.dead:  # killed while the call ran: its result is lost
            raise ReplicaDied(f"replica {replica.id} is dead")
        return result

    def kill(self, replica: Any) -> None:
        self.dead.add(replica.id)

    def name(self, replica: Any) -> str:
        return f"replica-{replica.id}"


class RayPool:
    """Replicas as Ray actors (not restarted by Ray: the router moves their streams).

    Args:
        num_cpus: CPUs Ray reserves for each replica.
        name, namespace: replica ``k`` is the named actor ``f"{name}-{k}"`` in ``namespace``
            (``ray.get_actor`` finds it); not named without a namespace.
        **worker_args: passed to :class:`StreamWorker`; the module travels once through the
            object store.

    Example (needs a running Ray instance, so skipped here):
        >>> import costream as cs
        >>> from costream.serve import RayPool, StreamRouter
        >>> pool = RayPool(num_cpus=1, module=cs.Conv1d(2, 3, 2), capacity=64,
        ...                frame_shape=(2,))  # doctest: +SKIP
        >>> router = StreamRouter(pool, replicas=2)  # doctest: +SKIP
    """

    def __init__(self, num_cpus: float = 1.0, *, name: str = "replica",
                 namespace: str | None = None, **worker_args: Any) -> None:
        import ray

        self.num_cpus, self.prefix, self.namespace = num_cpus, name, namespace
        self.worker_args = dict(worker_args)
        self.worker_args["module"] = ray.put(worker_args["module"])
        self._ids = itertools.count()
        self.names: dict[Any, str] = {}
        self._actor = ray.remote(StreamWorker)

    async def spawn(self) -> Any:
        wid = next(self._ids)
        name = f"{self.prefix}-{wid}"
        options = {"name": name, "namespace": self.namespace} if self.namespace else {}
        actor = self._actor.options(num_cpus=self.num_cpus, max_restarts=0, **options).remote(
            name=name, **self.worker_args)
        await self.call(actor, "pid")  # started (a top-level object ref arrives as its value)
        self.names[actor] = name
        return actor

    async def call(self, replica: Any, method: str, *args: Any) -> Any:
        from ray.exceptions import RayActorError

        try:
            return await getattr(replica, method).remote(*args)
        except RayActorError as err:
            raise ReplicaDied(str(err).splitlines()[0]) from err

    def kill(self, replica: Any) -> None:
        import ray

        ray.kill(replica, no_restart=True)

    def name(self, replica: Any) -> str:
        return self.names[replica]
