"""What ``costream bench`` runs: built-in workloads, zoo models and a user's own models.

A :class:`Workload` is a continual network with the frame shape it streams and the clip its
offline counterpart runs on. :func:`resolve_workload` turns a name into one:

* ``"tcn"``: a temporal convolutional network, 10 unpadded ``Conv1d(256, 256, 3)`` with ReLUs
  (receptive field 21 frames; the offline clip is the 21-frame window);
* ``"transformer"``: a 2-layer ``torch.nn.TransformerEncoder`` (d=512, 8 heads, feed-forward
  1024) over a window of 64 tokens, made continual (retroactive first layer, single-output
  last layer; Continual Transformers, arXiv 2201.06268);
* a continual model of :mod:`costream.models` (e.g. ``"cox3d_s"``): its native input size,
  logits (no head activation), the offline clip of its native length;
* ``"package.module:function"``: a ``torch.nn`` model returned by the function, converted with
  :func:`costream.continual` (the frame shape must then be given);
* a file written by ``costream convert`` (``model.pt`` next to ``model.pt.json``).
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..convert import continual
from ._converted import load_converted

__all__ = ["BUILTIN_WORKLOADS", "DEFAULT_MODELS", "Workload", "load_converted",
           "resolve_workload"]

#: The embedded default of ``costream bench``: models that run in seconds on a laptop CPU.
DEFAULT_MODELS = ("tcn", "transformer", "cox3d_xs", "cox3d_s", "cox3d_m", "cox3d_l", "coslow_r50",
                  "coi3d_r50")


@dataclass
class Workload:
    """A continual network to benchmark, with its input geometry.

    Args:
        name: the name shown in result tables.
        net: the continual network (eval mode).
        frame_shape: one input frame without batch, ``(C, *spatial)``.
        clip_length: frames of the clip the offline network runs on for one prediction.
        resize: optional ``resize(frames) -> (net, clip_length)``: the same network (same
            weights) with a window of ``frames`` frames, for window-length sweeps.
        step_depends_on_window: whether a resized network's step cost changes with the window
            (attention over a longer window) or not (a longer sliding pool).
        description: one line on what the network is.

    Example:
        >>> import torch, costream as cs
        >>> from costream.bench import Workload
        >>> net = cs.continual(torch.nn.Sequential(torch.nn.Conv1d(4, 8, 3))).eval()
        >>> w = Workload("conv", net, (4,), clip_length=net.receptive_field)
        >>> w.clip_shape(2)
        (2, 4, 3)
    """

    name: str
    net: nn.Module
    frame_shape: tuple[int, ...]
    clip_length: int
    resize: Callable[[int], tuple[nn.Module, int]] | None = field(default=None, repr=False)
    step_depends_on_window: bool = False
    description: str = ""

    def clip_shape(self, batch_size: int, frames: int | None = None) -> tuple[int, ...]:
        """Shape of a clip ``(B, C, T, *spatial)`` of ``frames`` (default: the clip length)."""
        t = self.clip_length if frames is None else frames
        return (batch_size, self.frame_shape[0], t, *self.frame_shape[1:])


def _tcn() -> Workload:
    layers: list[nn.Module] = []
    for i in range(10):
        layers += [nn.Conv1d(256, 256, 3)] + ([nn.ReLU()] if i < 9 else [])
    net = continual(nn.Sequential(*layers)).eval()
    return Workload("tcn", net, (256,), net.receptive_field,
                    description="10 x Conv1d(256, 256, k=3), ReLU between")


def _transformer_net(window: int, source: nn.Module | None = None) -> tuple[nn.Module, int]:
    if source is None:
        layer = nn.TransformerEncoderLayer(512, 8, 1024, dropout=0.0, batch_first=True)
        source = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    # the paper's running-sum attention update (as the anchor and the committed results);
    # the exact default executes 3.3 % more MACs per step on this workload
    return continual(source, temporal_window=window, attention="running").eval(), window


def _transformer() -> Workload:
    layer = nn.TransformerEncoderLayer(512, 8, 1024, dropout=0.0, batch_first=True)
    source = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    net, window = _transformer_net(64, source)
    return Workload("transformer", net, (512,), window,
                    resize=lambda w: _transformer_net(w, source), step_depends_on_window=True,
                    description="2-layer Transformer encoder, d=512, 8 heads, 64-token window")


#: Workloads built into costream.bench (name -> builder).
BUILTIN_WORKLOADS: dict[str, Callable[[], Workload]] = {"tcn": _tcn, "transformer": _transformer}


def _zoo(name: str) -> Workload | None:
    try:
        from ..models import create_model, list_models
    except ImportError:
        return None
    if name not in list_models():
        return None
    try:
        net = create_model(name, head_activation=None)
        options: dict[str, Any] = {"head_activation": None}
    except TypeError:  # a model without a head activation option
        net = create_model(name)
        options = {}
    if not getattr(net, "streamable", True):
        raise ValueError(f"{name} is an offline model and cannot be stepped; benchmark its "
                         f"continual version (e.g. co{name})")
    shape = getattr(net, "input_shape", None)
    if shape is None:
        raise ValueError(f"zoo model {name} does not declare its input_shape")
    frame_shape = (int(shape[0]), *(int(v) for v in shape[2:]))

    def resize(frames: int) -> tuple[nn.Module, int]:
        other = create_model(name, clip_length=frames, **options)
        other.load_state_dict(net.state_dict())
        return other.eval(), frames

    return Workload(name, net.eval(), frame_shape, int(shape[1]), resize=resize,
                    description=f"{type(net).__name__}({net.extra_repr()})")


def build_source(source: str) -> nn.Module:
    """Import ``package.module:function`` and call it; the result must be a ``torch.nn.Module``.

    The working directory is importable (it is on ``sys.path`` while the module is imported
    and the function runs), so ``mymodel:build`` finds ``./mymodel.py``.

    Example:
        >>> from costream.bench._workloads import build_source
        >>> build_source("costream.demo:build_tcn").training
        False
    """
    fn = import_builder(source)
    with _cwd_importable():
        model = fn()
    if not isinstance(model, nn.Module):
        raise TypeError(f"{source} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def import_builder(source: str) -> Callable[[], Any]:
    """The function ``package.module:function`` names, imported (the working directory is
    importable) but not called.

    Example:
        >>> from costream.bench._workloads import import_builder
        >>> import_builder("costream.demo:no_such_function")
        Traceback (most recent call last):
        ...
        AttributeError: costream.demo:no_such_function: costream.demo has no attribute ...
    """
    mod_name, sep, fn_name = source.partition(":")
    if not sep or not mod_name or not fn_name:
        raise ValueError(f"expected package.module:function, got {source!r}")
    with _cwd_importable() as cwd:
        try:
            fn: Any = importlib.import_module(mod_name)
        except ModuleNotFoundError as err:
            raise ModuleNotFoundError(f"{source}: no module named {err.name!r} (searched the "
                                      f"working directory {cwd} and sys.path)",
                                      name=err.name) from err
    for part in fn_name.split("."):
        if not hasattr(fn, part):
            raise AttributeError(f"{source}: {mod_name} has no attribute {fn_name!r}")
        fn = getattr(fn, part)
    if not callable(fn):
        raise TypeError(f"{source}: {fn_name} is a {type(fn).__name__}, not a function")
    return fn


def check_model_name(spec: str, *, trust: bool = False) -> None:
    """Raise what :func:`resolve_workload` would for a name that cannot resolve, cheaply:
    nothing is built (a ``module:function`` is imported, not called; a converted file's spec
    and checksums are read).

    Example:
        >>> from costream.bench._workloads import check_model_name
        >>> check_model_name("tcn")
        >>> check_model_name("cox3d_s")
    """
    from ._converted import read_spec

    if spec in BUILTIN_WORKLOADS:
        return
    if spec.endswith((".pt", ".pth")) and Path(spec).exists():
        info = read_spec(spec)
        if not trust:
            load_converted(spec, trust=False)  # raises: the file's builder runs only if trusted
        import_builder(info["source"])
    elif ":" in spec:
        import_builder(spec)
    elif spec not in _zoo_names():
        known = ", ".join([*BUILTIN_WORKLOADS, *_zoo_names()])
        raise KeyError(f"unknown model {spec!r}: give one of {known}, "
                       f"package.module:function or a file written by `costream convert`")


@contextlib.contextmanager
def _cwd_importable() -> Iterator[str]:
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        yield cwd
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)


def resolve_workload(spec: str | Workload, frame_shape: tuple[int, ...] | None = None, *,
                     temporal_window: int | None = None, seed: int = 0,
                     trust: bool = False) -> Workload:
    """The :class:`Workload` for a built-in name, a zoo model, ``module:function`` or a file.

    Weights are random (seeded with ``seed``) unless the spec is a converted file or the
    function loads its own. ``frame_shape`` ``(C, *spatial)`` overrides the model's native
    frame shape; it is required for ``module:function`` models that are not 1D (frames
    ``(B, C)``). ``temporal_window`` is passed to :func:`costream.continual` for models with
    attention. A file written by ``costream convert`` names the function that builds it, which
    runs only with ``trust=True`` (see :func:`load_converted`).

    Example:
        >>> from costream.bench import resolve_workload
        >>> w = resolve_workload("tcn")
        >>> w.frame_shape, w.clip_length, w.net.receptive_field
        ((256,), 21, 21)
    """
    if isinstance(spec, Workload):
        return spec
    torch.manual_seed(seed)
    if spec in BUILTIN_WORKLOADS:
        w = BUILTIN_WORKLOADS[spec]()
    elif spec.endswith((".pt", ".pth")) and Path(spec).exists():
        net, info = load_converted(spec, trust=trust)
        shape = tuple(frame_shape or info["frame_shape"])
        w = Workload(Path(spec).stem, net, shape, net.receptive_field,
                     description=f"converted from {info['source']}")
    elif ":" in spec:
        options = {} if temporal_window is None else {"temporal_window": temporal_window}
        net = continual(build_source(spec), **options).eval()
        shape = frame_shape or _infer_frame_shape(net, spec)
        w = Workload(spec.rsplit(":", 1)[1], net, tuple(shape), net.receptive_field,
                     description=spec)
    else:
        found = _zoo(spec)
        if found is None:
            check_model_name(spec)  # raises, naming the known models
        w = found
    if frame_shape is not None:
        w = copy.copy(w)
        w.frame_shape = tuple(int(v) for v in frame_shape)
    return w


def _zoo_names() -> list[str]:
    try:
        from ..models import list_models
    except ImportError:
        return []
    return list_models()


def _infer_frame_shape(net: nn.Module, spec: str) -> tuple[int, ...]:
    for m in net.modules():
        spec_fn = getattr(m, "_input_spec", None)
        if spec_fn is None:
            continue
        ndim, channels = spec_fn()
        if ndim == 2 and channels is not None:
            return (channels,)
        if ndim is not None:
            break
    raise ValueError(f"{spec}: give the frame shape (C,H,W or C) of its input")
