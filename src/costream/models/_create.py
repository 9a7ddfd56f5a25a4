"""``create_model``: build a registered model, optionally loading a published checkpoint.

It sits above both the registry and the checkpoint loader (which knows the model classes), so
neither imports the other's dependents.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from ._checkpoints import architecture_options, load_checkpoint, read_checkpoint
from ._registry import list_models, registered


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
    fn = registered(name)
    if fn is None:
        close = difflib.get_close_matches(name, list_models(), n=3)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        raise KeyError(f"unknown model {name!r}{hint} Registered: {', '.join(list_models())}")
    model = fn(**kwargs)
    if checkpoint is not None:
        state = read_checkpoint(checkpoint) if isinstance(checkpoint, (str, Path)) else checkpoint
        options = {k: v for k, v in architecture_options(state, model).items()
                   if k not in kwargs}
        if options:  # the checkpoint holds an architecture variant: build that one
            model = fn(**kwargs, **options)
        load_checkpoint(model, state)
    return model.eval()
