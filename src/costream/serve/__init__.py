"""Serve many streams across processes and machines on Ray Serve, with failover (see
``docs/serving.md``). Needs the ``serve`` extra for everything that touches Ray; the router and
replicas also run in one process (:class:`LocalPool`)."""

from .._lazy import lazy_exports

_EXPORTS = {
    "LocalPool": "_pool", "RayPool": "_pool", "ReplicaDied": "_pool",
    "Snapshot": "_worker", "StreamWorker": "_worker",
    "StreamRouter": "_router",
    "ServeConfig": "_app", "build_app": "_app", "run_app": "_app",
    "StreamClient": "_client", "Stream": "_client",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, __all__)
