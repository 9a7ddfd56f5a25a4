"""Published ST-GCN family checkpoints: the key layout and its mapping onto :class:`STGCN`.

The published ST-GCN, AGCN and S-TR weights (and those of their continual versions, which share
them) come as a ``.pt`` state dict or a PyTorch Lightning ``.ckpt`` (a dict whose
``state_dict`` holds the weights, keys possibly prefixed with ``model.``). Keys::

    data_bn.{weight,bias,running_mean,running_var}
    layers.layerK.gcn.{A, graph_attn, g_conv.{0,1,2}, gcn_residual.{0,1}, bn}      ST-GCN
    layers.layerK.gcn.{..., a_conv.{0,1,2}, b_conv.{0,1,2}}                        AGCN
    layers.layerK.gcn.{A, data_bn, attention_conv.{qkv_conv,attn_out}, bn}         S-TR
    layers.layerK.tcn.{t_conv,bn}   layers.layerK.residual.{t_conv,bn}   fc.{weight,bias}

In :class:`STGCN` a block's graph layer and temporal convolution sit in its ``main`` branch
(``layers.layerK.main.gcn``, ``layers.layerK.main.tcn``); everything else keeps its name, so
the mapping inserts ``main.`` and drops the ``model.`` prefix. :func:`costream.models.
load_checkpoint` and ``create_model(name, checkpoint=...)`` detect this layout (``"stgcn"``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from torch import Tensor

from .._rename import rename_keys

_PREFIX = re.compile(r"^model\.")
_BLOCK = re.compile(r"^layers\.(layer\d+)\.(gcn|tcn)\.")
_DETECT = re.compile(r"^(model\.)?(data_bn\.|layers\.layer\d+\.)")


def is_stgcn_layout(keys: list[str]) -> bool:
    """Whether state-dict ``keys`` have the ST-GCN family's layout (published or costream)."""
    return bool(keys) and any(_DETECT.match(k) for k in keys) and all(
        _DETECT.match(k) or _PREFIX.sub("", k).startswith("fc.") for k in keys)


def map_stgcn_keys(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename published ST-GCN family keys to :class:`~costream.models.STGCN`'s.

    Keys already in costream's layout pass unchanged. Two keys that rename onto one (e.g.
    ``model.fc.weight`` next to ``fc.weight``) raise :class:`~costream.models.CheckpointError`
    naming both.

    Example:
        >>> import torch
        >>> from costream.models.skeleton._skeleton_checkpoints import map_stgcn_keys
        >>> state = {"model.layers.layer5.gcn.g_conv.0.weight": torch.zeros(1),
        ...          "model.layers.layer5.residual.t_conv.weight": torch.zeros(1)}
        >>> list(map_stgcn_keys(state))
        ['layers.layer5.main.gcn.g_conv.0.weight', 'layers.layer5.residual.t_conv.weight']
    """
    return rename_keys(state, stgcn_key)


def stgcn_key(key: str) -> str:
    """The :class:`~costream.models.STGCN` key of one published ST-GCN family key."""
    return _BLOCK.sub(r"layers.\1.main.\2.", _PREFIX.sub("", key), count=1)
