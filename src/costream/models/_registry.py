"""The model registry: ``create_model(name, **kwargs)`` and ``list_models()``.

Model functions register themselves with :func:`register_model`; the test suite is driven by
this registry, so every registered model is checked against the streaming contract and counted
by the MAC counter without further code.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from torch import nn

ModelFn = Callable[..., nn.Module]
_MODELS: dict[str, ModelFn] = {}
_FAMILIES: dict[str, str] = {}

#: What a model family consumes per step: ``"video"`` (frames ``(C, H, W)``), ``"skeleton"``
#: (joint coordinates ``(C, V, M)``) or ``"features"`` (feature vectors ``(C,)``).
FAMILIES = ("video", "skeleton", "features")


def register_model(fn: ModelFn | None = None, *, family: str = "video") -> Any:
    """Register ``fn`` under its ``__name__`` (usable as a decorator); names are unique.

    Registered models are built by :func:`create_model` and checked by the zoo's tests, which
    pick their test inputs by the model's ``family`` (one of ``"video"``, ``"skeleton"``,
    ``"features"``). Use ``@register_model(family="skeleton")`` for other families.

    Example:
        >>> from costream.models import X3D, create_model, register_model
        >>> @register_model
        ... def my_cox3d_s_replicate(**kwargs):
        ...     return X3D("s", se_scope="frame", temporal_fill="replicate", **kwargs)
        >>> create_model("my_cox3d_s_replicate").temporal_fill
        'replicate'
    """
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    if fn is None:
        return lambda f: register_model(f, family=family)
    name = fn.__name__
    if name in _MODELS:
        raise ValueError(f"a model named {name!r} is already registered")
    _MODELS[name] = fn
    _FAMILIES[name] = family
    return fn


def list_models(pattern: str = "*", family: str | None = None) -> list[str]:
    """Names of the registered models matching the shell-style ``pattern``, sorted.

    Args:
        pattern: shell-style pattern on the name.
        family: only models of this family (``"video"``, ``"skeleton"``, ``"features"``).

    Example:
        >>> from costream.models import list_models
        >>> list_models("cox3d_*")
        ['cox3d_l', 'cox3d_m', 'cox3d_s', 'cox3d_xs']
        >>> "x3d_s" in list_models(family="video")
        True
    """
    if family is not None and family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    return sorted(n for n in _MODELS if fnmatch.fnmatchcase(n, pattern)
                  and (family is None or _FAMILIES[n] == family))


def model_family(name: str) -> str:
    """The family (``"video"``, ``"skeleton"`` or ``"features"``) of the registered ``name``.

    Example:
        >>> from costream.models import model_family
        >>> model_family("cox3d_s")
        'video'
    """
    if name not in _FAMILIES:
        raise KeyError(f"unknown model {name!r}")
    return _FAMILIES[name]


def create_model(name: str, *, checkpoint: str | Path | Mapping[str, Any] | None = None,
                 **kwargs: Any) -> nn.Module:
    """Build the registered model ``name`` in eval mode, optionally loading a checkpoint.

    Args:
        name: a name from :func:`list_models`, e.g. ``"x3d_s"`` (offline original) or
            ``"cox3d_s"`` (its continual version).
        checkpoint: a PyTorchVideo or PySlowFast ``.pyth`` file (or a loaded dict, or a
            costream state dict) loaded with :func:`costream.models.load_checkpoint`; where
            the publications differ (X3D's res2 shortcut), the variant it holds is built.
        **kwargs: model options, e.g. ``num_classes``, ``crop_size``, ``clip_length``,
            ``temporal_fill``, ``head_pool`` and (X3D) ``se_scope``; see each model's docstring.

    Raises:
        KeyError: for an unknown name (with the closest registered names).

    Example:
        >>> from costream.models import create_model
        >>> net = create_model("cox3d_s", num_classes=10, head_pool=64)
        >>> net.receptive_field, net.delay  # 57 conv frames + 63 pooled, 28 of them padding
        (120, 91)
    """
    fn = _MODELS.get(name)
    if fn is None:
        close = difflib.get_close_matches(name, list(_MODELS), n=3)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        raise KeyError(f"unknown model {name!r}{hint} Registered: {', '.join(list_models())}")
    model = fn(**kwargs)
    if checkpoint is not None:
        from ._checkpoints import architecture_options, load_checkpoint, read_checkpoint

        state = read_checkpoint(checkpoint) if isinstance(checkpoint, (str, Path)) else checkpoint
        options = {k: v for k, v in architecture_options(state, model).items()
                   if k not in kwargs}
        if options:  # the checkpoint holds an architecture variant: build that one
            model = fn(**kwargs, **options)
        load_checkpoint(model, state)
    return model.eval()
