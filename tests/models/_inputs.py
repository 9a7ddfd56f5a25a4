"""Small configurations and input streams for every registered zoo model, by family.

Shared by the tests that run every zoo model through a deployment path (ONNX export, compiled
stepping): :func:`small_zoo_model` builds ``name`` at a test size chosen by its family, and
:func:`zoo_stream` draws a stream of frames for it. A new family needs one entry in
``SMALL_OPTIONS``; the frame shape comes from the model's ``input_shape`` ``(C, T, *spatial)``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from costream.models import create_model, list_models, model_family


def _video(name: str) -> dict[str, Any]:
    # 16x16 frames (res5 maps are 1x1) and a 2-frame head window: receptive fields 20-116
    return {"num_classes": 5, "head_pool": 2, "crop_size": 16}


def _skeleton(name: str) -> dict[str, Any]:
    # width 8, 2 heads; the * variants (no temporal padding) need an 80-frame conv window + 4
    return {"num_classes": 5, "width": 8, "heads": 2,
            "clip_length": 84 if name.endswith("_star") else 8}


def _features(name: str) -> dict[str, Any]:
    options = {"in_features": 6, "num_classes": 3, "window": 4, "embed_dim": 8, "num_heads": 2,
               "mlp_dim": 12}
    if name == "oadtr":  # the offline baseline also has a decoder
        options.update(num_layers=2, decoder_layers=2, decoder_heads=2, decoder_mlp_dim=12,
                       num_queries=3)
    return options


#: ``family -> (model name -> create_model options)`` giving a small, fast test configuration.
SMALL_OPTIONS: dict[str, Callable[[str], dict[str, Any]]] = {
    "video": _video, "skeleton": _skeleton, "features": _features}


def small_zoo_model(name: str, dtype: torch.dtype = torch.float32) -> tuple[nn.Module,
                                                                            tuple[int, ...]]:
    """``name`` at its family's test size, in eval mode and ``dtype``, and its frame shape."""
    family = model_family(name)
    if family not in SMALL_OPTIONS:
        raise KeyError(f"no test configuration for the {family!r} family of {name!r}: add one "
                       f"to SMALL_OPTIONS in tests/models/_inputs.py")
    model = create_model(name, **SMALL_OPTIONS[family](name)).to(dtype).eval()
    shape = tuple(int(v) for v in model.input_shape)
    return model, (shape[0], *shape[2:])


def zoo_stream(frame_shape: tuple[int, ...], batch: int, frames: int,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A random stream ``(B, C, T, *spatial)`` of ``frames`` frames."""
    return torch.randn(batch, frame_shape[0], frames, *frame_shape[1:], dtype=dtype)


def architecture(model: nn.Module) -> tuple:
    """What a model's step computes, up to its weights: every submodule's path, type and
    configuration, the parameter and buffer shapes and the temporal geometry. Registered names
    that differ only in defaults the test configuration overrides (e.g. X3D-XS/S/M at one crop
    size, or an offline original and its continual version built alike) share it."""
    modules = tuple((n, type(m).__qualname__, m.extra_repr()) for n, m in model.named_modules()
                    if n)
    shapes = tuple((k, tuple(v.shape)) for k, v in model.state_dict().items())
    t = model.temporal
    return (type(model).__qualname__, modules, shapes,
            (t.receptive_field, t.stride, t.padding, t.end_padding))


def streamable_zoo_architectures() -> dict[str, list[str]]:
    """Streamable registered models grouped by :func:`architecture`: ``{first name: names}``.

    Tests that cost seconds per architecture (export, compilation) run once per group.
    """
    groups: dict[tuple, list[str]] = {}
    for name in streamable_zoo_models():
        groups.setdefault(_info(name)[1], []).append(name)
    return {names[0]: names for names in groups.values()}


def one_per_architecture(names: list[str]) -> dict[str, list[str]]:
    """``names`` with streamable twins (one architecture at the test size, see
    :func:`streamable_zoo_architectures`) collapsed to the first: ``{name: names it stands
    for}``. Offline-only names stand for themselves."""
    twins = {n: group for group in streamable_zoo_architectures().values() for n in group}
    out: dict[str, list[str]] = {}
    for name in names:
        group = [n for n in twins.get(name, [name]) if n in names]
        out.setdefault(group[0], group)
    return out


def streamable_zoo_layer_sets() -> dict[str, list[str]]:
    """Streamable registered models grouped by the set of distinct layers they are built from
    (every submodule's type and configuration, however often it repeats): ``{representative:
    names}``, the representative being the member with the fewest modules.

    Coarser than :func:`streamable_zoo_architectures`: a model that stacks more of the same
    blocks (X3D-L at the test size repeats X3D-M's blocks) joins the shallower model's group.
    Tests that cost seconds per model and check what each kind of layer does (export,
    compilation) run once per group, on its representative.
    """
    groups: dict[frozenset, list[str]] = {}
    for name in streamable_zoo_models():
        groups.setdefault(_info(name)[2], []).append(name)
    return {min(names, key=lambda n: _info(n)[3]): names for names in groups.values()}


def streamable_zoo_models() -> list[str]:
    """Registered models that can be stepped (offline-only models are excluded)."""
    return [n for n in list_models() if _streamable(n)]


def offline_zoo_models() -> list[str]:
    """Registered models that run on whole clips only (``streamable`` is false)."""
    return [n for n in list_models() if not _streamable(n)]


def _streamable(name: str) -> bool:
    return _info(name)[0]


@functools.cache
def _info(name: str) -> tuple[bool, tuple, frozenset, int]:
    model = small_zoo_model(name)[0]
    layers = frozenset((type(model).__qualname__, *((type(m).__qualname__, m.extra_repr())
                                                    for n, m in model.named_modules() if n)))
    return (bool(getattr(model, "streamable", True)), architecture(model), layers,
            len(list(model.modules())))
