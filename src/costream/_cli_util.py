"""Pieces shared by the ``costream`` subcommands: argument types, output checks, user errors.

A user error (a bad name, value or path) is one line on stderr and exit status 2; ``--debug``
shows the traceback instead.
"""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import Iterator
from pathlib import Path


class UsageError(Exception):
    """A user error: printed as one line (``PROG: error: MESSAGE``), exit status 2."""

    def __init__(self, message: str, prog: str | None = None) -> None:
        super().__init__(message)
        self.prog = prog


class ArgumentParser(argparse.ArgumentParser):
    """An ``argparse`` parser whose errors are one line (no usage block), as UsageError."""

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(f"{message} (see {self.prog} --help)", prog=self.prog)


def one_line(err: BaseException) -> str:
    """The first line of an exception's message (a ``KeyError``'s without the quotes)."""
    text = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def positive_int(text: str) -> int:
    """``argparse`` type: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def shape(text: str) -> tuple[int, ...]:
    """``argparse`` type: positive integers separated by commas, e.g. ``3,112,112``."""
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(
            f"expected positive integers separated by commas (e.g. 3,112,112), got {text!r}")
    return values


def device(text: str) -> str:
    """``argparse`` type: a torch device that exists on this machine (``cpu``, ``cuda:0``)."""
    import torch

    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"unknown device {text!r} (e.g. cpu, cuda, cuda:1)"
                                         ) from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text}: this machine has no CUDA device "
                                             f"(torch.cuda.is_available() is False)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text}: this machine has "
                                             f"{torch.cuda.device_count()} CUDA device(s)")
    elif dev.type != "cpu":
        raise argparse.ArgumentTypeError(f"device {text!r}: choose cpu or cuda[:N]")
    return text


def check_writable(path: str | os.PathLike | None, flag: str) -> None:
    """Raise :class:`UsageError` unless ``path`` can be written (``None`` and ``-`` pass).

    Missing parent folders are fine if they can be created below a writable folder.
    """
    if path is None or str(path) == "-":
        return
    p = Path(path)
    if p.is_dir():
        raise UsageError(f"{flag} {path}: is a directory")
    if p.exists():
        if not os.access(p, os.W_OK):
            raise UsageError(f"{flag} {path}: not writable")
        return
    folder = p.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise UsageError(f"{flag} {path}: {folder} is not a directory")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path}: cannot write in {folder}")


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn what resolving a model raises for bad input (unknown name, module or function,
    a damaged or untrusted file) into :class:`UsageError`."""
    try:
        yield
    except (KeyError, ValueError, TypeError, ImportError, AttributeError, OSError) as err:
        raise UsageError(one_line(err)) from err


def probe_frames(net, frame_shape: tuple[int, ...], model: str, batch_size: int = 1) -> None:
    """Step ``net`` once on a zero frame of ``frame_shape`` (then reset it): a shape that does
    not fit raises :class:`UsageError` before anything else runs."""
    import torch

    dtype = next((p.dtype for p in net.parameters() if p.is_floating_point()), torch.float32)
    with frame_errors(frame_shape, model), torch.inference_mode():
        net.reset_state()
        net.forward_step(torch.zeros(batch_size, *frame_shape, dtype=dtype))
    net.reset_state()


@contextlib.contextmanager
def frame_errors(frame_shape: tuple[int, ...] | None, model: str) -> Iterator[None]:
    """Turn an error of the first run of ``model`` into :class:`UsageError` naming the shape."""
    try:
        yield
    except (RuntimeError, ValueError) as err:
        shape_text = "its default" if frame_shape is None else ",".join(map(str, frame_shape))
        raise UsageError(f"{model} fails on frames of shape {shape_text}: {one_line(err)}"
                         ) from err


def load_model(spec: str, *, trust: bool = False, temporal_window: int | None = None):
    """A continual model from a zoo name (``costream.models``), ``package.module:function`` or a
    file written by ``costream convert`` (whose builder runs only with ``trust``).

    Raises:
        UsageError: the name cannot be resolved (one line saying why).
    """
    import torch

    from .bench._workloads import build_source, load_converted
    from .convert import continual

    with user_errors():
        if spec.endswith((".pt", ".pth")) and Path(spec).exists():  # from `costream convert`
            return load_converted(spec, trust=trust)[0]
        if ":" in spec:
            model = build_source(spec)
        else:
            try:
                from .models import create_model, list_models
            except ImportError as err:
                raise UsageError(f"unknown model {spec!r}: give package.module:function") from err
            if spec not in list_models():
                raise UsageError(f"unknown model {spec!r}: give one of {', '.join(list_models())}"
                                 f", package.module:function or a file written by "
                                 f"`costream convert`")
            model = create_model(spec)
        if not isinstance(model, torch.nn.Module):
            raise UsageError(f"{spec} did not return a torch.nn.Module")
        options = {} if temporal_window is None else {"temporal_window": temporal_window}
        return continual(model, **options).eval()
