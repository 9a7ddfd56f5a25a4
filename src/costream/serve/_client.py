"""The Python handle API: open a stream, send it frames, close it."""

from __future__ import annotations

from typing import Any

from torch import Tensor


class StreamClient:
    """Streams of a deployed costream app, through its Serve handle.

    Args:
        handle: the app's ``DeploymentHandle`` (from :func:`run_app` or ``serve.run``), or
            ``None`` for ``serve.get_app_handle(app)``.
        app: the application's name.

    Example (needs a running app, so skipped here):
        >>> import torch
        >>> from costream.serve import ServeConfig, StreamClient, run_app
        >>> client = StreamClient(run_app(ServeConfig("tcn")))  # doctest: +SKIP
        >>> cam = client.open()  # doctest: +SKIP
        >>> out = cam.send(torch.randn(256))  # doctest: +SKIP
        >>> cam.close()  # doctest: +SKIP
    """

    def __init__(self, handle: Any = None, app: str = "costream") -> None:
        if handle is None:
            from ray import serve

            handle = serve.get_app_handle(app)
        self.handle = handle

    def open(self) -> Stream:
        """Open a stream on the least loaded replica."""
        return Stream(self.handle, self.handle.open.remote().result())

    async def open_async(self) -> Stream:
        """:meth:`open` from a running event loop."""
        return Stream(self.handle, await self.handle.open.remote())

    def send_many(self, frames: dict[Stream, Any]) -> dict[Stream, Tensor | None]:
        """Step several streams by one frame each in one call."""
        outs = self.handle.send_many.remote({s.key: f for s, f in frames.items()}).result()
        return {s: outs[s.key] for s in frames}

    def stats(self) -> dict[str, Any]:
        """Streams per replica and the recoveries so far."""
        return self.handle.stats.remote().result()


class Stream:
    """One open stream: ``send(frame) -> output | None``, ``reset()``, ``close()`` (and
    ``*_async`` variants to keep many streams in flight from one event loop).

    Example (needs a running app, so skipped here):
        >>> import torch
        >>> from costream.serve import StreamClient
        >>> cam = StreamClient(app="costream").open()  # doctest: +SKIP
        >>> cam.send(torch.randn(256)) is None  # warming up  # doctest: +SKIP
        True
        >>> cam.reset(); cam.close()  # doctest: +SKIP
    """

    def __init__(self, handle: Any, key: str) -> None:
        self.handle, self.key = handle, key

    def send(self, frame: Any) -> Tensor | None:
        """Step the stream by ``frame`` (tensor or array of the app's frame shape)."""
        return self.handle.send.remote(self.key, frame).result()

    async def send_async(self, frame: Any) -> Tensor | None:
        return await self.handle.send.remote(self.key, frame)

    def reset(self) -> None:
        """Restart the stream from a fresh state."""
        self.handle.reset.remote(self.key).result()

    async def reset_async(self) -> None:
        await self.handle.reset.remote(self.key)

    def close(self) -> None:
        """End the stream."""
        self.handle.close.remote(self.key).result()

    async def close_async(self) -> None:
        await self.handle.close.remote(self.key)
