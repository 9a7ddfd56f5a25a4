"""The model registry: :func:`register_model`, :func:`list_models` and :func:`model_family`.

Model functions register themselves with :func:`register_model`; the test suite is driven by
this registry, so every registered model is checked against the streaming contract and counted
by the MAC counter without further code. The registry imports no model and no loader (the model
modules import it); :func:`costream.models.create_model` (``_create.py``) builds from it.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
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

    Registered models are built by :func:`~costream.models.create_model` and checked by the
    zoo's tests, which pick their test inputs by the model's ``family`` (one of ``"video"``,
    ``"skeleton"``, ``"features"``). Use ``@register_model(family="skeleton")`` for other families.

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


def registered(name: str) -> ModelFn | None:
    """The function registered as ``name``, or ``None``."""
    return _MODELS.get(name)
