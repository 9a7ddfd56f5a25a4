"""The Ray Serve application: one ingress deployment that owns the replicas.

The ingress (a Serve deployment with a FastAPI app) answers HTTP, WebSocket and Python handle
calls. It holds the :class:`~costream.serve.StreamRouter`: the map of streams to replicas, the
per-stream logs, the micro-batching queues. The replicas are Ray actors it starts, each running a
:class:`~costream.serve.StreamWorker`, called by actor handle (see ``docs/serving.md`` for why
not through Serve's own request routing).
"""


import asyncio
import uuid
from dataclasses import dataclass
from typing import Any

import torch
from fastapi import FastAPI, HTTPException, Request, WebSocket, WebSocketDisconnect
from ray import serve

from ..core._module import CoModule
from ._codec import FrameError, check_frame, decode_frame, encode_output
from ._memory import choose_capped_log
from ._pool import RayPool
from ._router import StreamRouter

NAMESPACE = "costream"


@dataclass
class ServeConfig:
    """What to serve and how.

    Args:
        model: a continual module, a zoo or built-in workload name (``costream bench``'s names,
            e.g. ``"tcn"``), a converted-model file, ``package.module:function``, or a
            zero-argument callable returning a module (converted if not continual).
        frame_shape: ``(C, *spatial)``; required for a module or callable.
        replicas: replicas (Ray actors, each with a ``StreamEngine``).
        capacity: stream slots per replica.
        dtype: serving precision (``"float32"``, ``"float64"``; default the model's).
        max_batch: streams per batched call inside a replica (``StreamEngine``).
        batch_window_ms: how long frames of many streams are collected for one call.
        snapshot_every_s: seconds between a replica's snapshots (``None``: never).
        snapshot_dir: write snapshots to files here (shared storage in a cluster) instead of
            passing them through Ray's object store.
        replica_cpus: CPUs Ray reserves per replica; threads: torch threads per replica.
        capped_log: keep per stream only the frames a fresh state needs to rebuild it (finite
            receptive field). ``None``: where a check on random frames shows that such a
            replay rebuilds the stream (not for recurrent layers); ``True`` refuses a network
            that fails the check.
        respawn: start a new replica when one dies.

    Example:
        >>> from costream.serve import ServeConfig
        >>> ServeConfig("tcn", replicas=4, batch_window_ms=2).replicas
        4
    """

    model: Any
    frame_shape: tuple[int, ...] | None = None
    replicas: int = 2
    capacity: int = 64
    dtype: str | None = None
    max_batch: int | None = None
    batch_window_ms: float = 5.0
    snapshot_every_s: float | None = 1.0
    snapshot_dir: str | None = None
    replica_cpus: float = 1.0
    threads: int | None = 1
    capped_log: bool | None = None
    respawn: bool = True


def resolve_model(model: Any, frame_shape: tuple[int, ...] | None
                  ) -> tuple[CoModule, tuple[int, ...]]:
    """The continual module and frame shape a :class:`ServeConfig` names."""
    if isinstance(model, str):
        from ..bench import resolve_workload

        w = resolve_workload(model, frame_shape)
        return w.net.eval(), tuple(w.frame_shape)
    if not isinstance(model, torch.nn.Module) and callable(model):
        model = model()
    if not isinstance(model, CoModule):
        from ..convert import continual

        model = continual(model)
    if frame_shape is None:
        raise ValueError("frame_shape is required when serving a module or a builder")
    return model.eval(), tuple(frame_shape)


async def _answer(call: Any) -> Any:
    """Await ``call``; a refused frame, an unknown stream or a full app becomes an HTTP error
    with its one-line message (422/400, 404, 503). Defined before the ingress class: the
    routes it serves do not see names defined after it."""
    try:
        return await call
    except FrameError as err:
        raise HTTPException(err.status, str(err)) from err
    except KeyError as err:
        raise HTTPException(404, err.args[0]) from err
    except RuntimeError as err:
        raise HTTPException(503, str(err)) from err


api = FastAPI(title="costream streams")


@serve.deployment(num_replicas=1, max_ongoing_requests=100_000,
                  ray_actor_options={"num_cpus": 0})
@serve.ingress(api)
class StreamIngress:
    """The ingress: HTTP (``/streams``), WebSocket (``/streams/{id}/ws``) and handle methods
    (``open``, ``send``, ``reset``, ``close``)."""

    def __init__(self, config: ServeConfig) -> None:
        module, self.frame_shape = resolve_model(config.model, config.frame_shape)
        if config.dtype is not None:
            module = module.to(getattr(torch, config.dtype))
        self.dtype = next((p.dtype for p in module.parameters()), torch.get_default_dtype())
        self.prefix = f"replica-{uuid.uuid4().hex[:8]}"
        pool = RayPool(num_cpus=config.replica_cpus, name=self.prefix, namespace=NAMESPACE,
                       module=module, capacity=config.capacity, frame_shape=self.frame_shape,
                       dtype=self.dtype, max_batch=config.max_batch,
                       snapshot_dir=config.snapshot_dir, threads=config.threads)
        t = module.temporal
        capped = choose_capped_log(module, self.frame_shape, config.capped_log,
                                   config.snapshot_every_s)
        self.router = StreamRouter(
            pool, config.replicas, batch_window_s=config.batch_window_ms / 1e3,
            snapshot_every_s=config.snapshot_every_s,
            receptive_field=t.receptive_field if capped else None,
            stride=t.stride, warm_up=module._total_delay(), respawn=config.respawn)
        self._started: asyncio.Task | None = None

    async def ready(self) -> dict[str, Any]:
        """Start the replicas (once); the serving facts."""
        if self._started is None:
            self._started = asyncio.ensure_future(self.router.start())
        await asyncio.shield(self._started)
        return {"frame_shape": list(self.frame_shape), "dtype": str(self.dtype)[6:],
                "replicas": [r.name for r in self.router.replicas]}

    # ------------------------------------------------------------------ handle API
    async def open(self) -> str:
        await self.ready()
        return await self.router.open()

    async def send(self, key: str, frame: Any) -> torch.Tensor | None:
        await self.ready()
        return await self.router.send(key, check_frame(frame, self.frame_shape, self.dtype))

    async def send_many(self, frames: dict[str, Any]) -> dict[str, torch.Tensor | None]:
        """Step several streams by one frame each in one call (a gateway hosting many
        cameras): ``{id: frame}`` in, ``{id: output or None}`` out. Every frame is checked
        before any is sent."""
        await self.ready()
        checked = {k: check_frame(f, self.frame_shape, self.dtype) for k, f in frames.items()}
        outs = await asyncio.gather(*[self.router.send(k, f) for k, f in checked.items()])
        return dict(zip(checked, outs))

    async def reset(self, key: str) -> None:
        await self.router.reset(key)

    async def close(self, key: str) -> None:
        await self.router.close(key)

    async def stats(self) -> dict[str, Any]:
        """Streams held per replica and the recoveries so far (with their durations)."""
        return {"replicas": {r.name: len(r.streams) for r in self.router.replicas},
                "streams": len(self.router.streams), "recoveries": self.router.recoveries}

    async def placement(self) -> dict[str, str]:
        return self.router.placement()

    async def scale(self, replicas: int) -> None:
        await self.router.scale(replicas)

    # ------------------------------------------------------------------ HTTP
    @api.post("/streams")
    async def http_open(self) -> dict[str, Any]:
        return {"stream": await _answer(self.open()), **await self.ready()}

    @api.post("/streams/{key}/frames")
    async def http_frame(self, key: str, request: Request, dtype: str | None = None,
                         shape: str | None = None) -> dict[str, Any]:
        body = await request.body()
        return encode_output(await _answer(self._send_bytes(key, body, dtype, shape)))

    async def _send_bytes(self, key: str, body: bytes, dtype: str | None,
                          shape: str | None) -> torch.Tensor | None:
        return await self.send(key, decode_frame(body, dtype=dtype, shape=shape))

    @api.post("/streams/{key}/reset")
    async def http_reset(self, key: str) -> dict[str, Any]:
        await _answer(self.reset(key))
        return {"stream": key, "reset": True}

    @api.delete("/streams/{key}")
    async def http_close(self, key: str) -> dict[str, Any]:
        await _answer(self.close(key))
        return {"stream": key, "closed": True}

    @api.websocket("/streams/{key}/ws")
    async def ws_frames(self, ws: WebSocket, key: str) -> None:
        """One message per frame in (binary ``.npy``, or raw bytes with ``dtype`` and
        ``shape`` query parameters); one JSON message per frame out, in order. A bad frame is
        answered with ``{"error", "status"}`` and the stream goes on."""
        await ws.accept()
        dtype, shape = ws.query_params.get("dtype"), ws.query_params.get("shape")
        try:
            while True:
                body = await ws.receive_bytes()
                try:
                    out = encode_output(await self._send_bytes(key, body, dtype, shape))
                except FrameError as err:
                    out = {"error": str(err), "status": err.status}
                except KeyError as err:
                    out = {"error": err.args[0], "status": 404}
                await ws.send_json(out)
        except WebSocketDisconnect:
            return


def build_app(config: ServeConfig) -> Any:
    """The Serve application for ``config`` (deploy it with ``serve.run``).

    Example:
        >>> from costream.serve import ServeConfig, build_app
        >>> app = build_app(ServeConfig("tcn", replicas=2))
        >>> type(app).__name__
        'Application'
    """
    return StreamIngress.bind(config)


def init_ray(address: str | None = None, num_cpus: int | None = None,
             attempts: int = 3) -> None:
    """Start a local Ray instance (no dashboard, no usage stats) or join ``address``; retry
    where a loaded machine makes the node miss Ray's fixed 30 s start-up wait."""
    import os

    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    for attempt in range(attempts):
        try:
            ray.init(address=address, num_cpus=num_cpus, include_dashboard=False,
                     log_to_driver=False, configure_logging=False)
            return
        except Exception as err:  # Ray raises a bare Exception for the start-up timeout
            ray.shutdown()
            if "timed out during startup" not in str(err) or attempt == attempts - 1:
                raise


def run_app(config: ServeConfig, *, port: int = 8000, host: str = "127.0.0.1",
            address: str | None = None, name: str = "costream", num_cpus: int | None = None,
            route_prefix: str = "/") -> Any:
    """Start (or join, with ``address``) Ray, deploy the app and wait for its replicas; return
    its handle.

    Example (starts Ray, so skipped here):
        >>> from costream.serve import ServeConfig, run_app
        >>> handle = run_app(ServeConfig("tcn", replicas=2), port=8000)  # doctest: +SKIP
        >>> key = handle.open.remote().result()  # doctest: +SKIP
    """
    import ray

    if not ray.is_initialized():
        init_ray(address, num_cpus)
    serve.start(http_options={"host": host, "port": port})
    handle = serve.run(build_app(config), name=name, route_prefix=route_prefix)
    handle.ready.remote().result()
    return handle
