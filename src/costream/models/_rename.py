"""Checkpoint key renaming shared by the zoo's loaders, and the error they raise.

Kept apart from the loader (``_checkpoints.py``, which knows the model classes) so the
family-specific key layouts (``skeleton/_skeleton_checkpoints.py``) can use it without an
import cycle.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from torch import Tensor


class CheckpointError(ValueError):
    """A checkpoint does not fit a model (missing or unexpected keys, shape mismatches).

    Example:
        >>> import torch
        >>> from costream.models import CheckpointError, create_model, load_checkpoint
        >>> state = create_model("x3d_xs", num_classes=10).state_dict()
        >>> try:
        ...     load_checkpoint(create_model("x3d_xs"), state)
        ... except CheckpointError as err:
        ...     print(str(err).splitlines()[-1].strip())
        head.proj.bias: checkpoint (10,), model (400,)
    """


def rename_keys(state: Mapping[str, Tensor], rename: Callable[[str], str]) -> dict[str, Tensor]:
    """``{rename(key): value}`` of ``state``; two keys renamed onto one are refused.

    Raises:
        CheckpointError: naming both source keys and the model key they share (otherwise the
            later one would silently win).

    Example:
        >>> import torch
        >>> from costream.models._rename import CheckpointError, rename_keys
        >>> state = {"model.fc.weight": torch.zeros(1), "fc.weight": torch.ones(1)}
        >>> try:
        ...     rename_keys(state, lambda k: k.removeprefix("model."))
        ... except CheckpointError as err:
        ...     print(err)
        checkpoint keys 'model.fc.weight' and 'fc.weight' both map to the model key
        'fc.weight'; keep one of them
    """
    out: dict[str, Tensor] = {}
    origin: dict[str, str] = {}
    for key, value in state.items():
        new = rename(key)
        if new in out:
            raise CheckpointError(f"checkpoint keys {origin[new]!r} and {key!r} both map to the "
                                  f"model key {new!r}; keep one of them")
        out[new], origin[new] = value, key
    return out
