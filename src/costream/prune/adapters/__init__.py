"""Structured Pruning Adapters: SPLoRA, SPPaRA and SPLoPA (Hedegaard et al., arXiv 2211.10155).

Adapters wrap a (frozen) base layer and learn a small update of its weights; channel pruning
slices base and adapter alike, and :func:`merge_adapters` folds them into plain dense layers of
the pruned shape. A task is stored as masks plus adapter weights (:func:`save_artifact`) and
rebuilt from the base model (:func:`load_artifact`).

Example:
    >>> import torch
    >>> from costream.prune import prune
    >>> from costream.prune.adapters import SPLoRAConfig, add_adapters, merge_adapters
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(),
    ...                           torch.nn.Conv2d(8, 4, 3))
    >>> net = add_adapters(net, SPLoRAConfig(rank=2))
    >>> _ = prune(net, torch.randn(1, 3, 9, 9), "l1", density=0.5)  # base and adapters shrink
    >>> x = torch.randn(1, 3, 9, 9)
    >>> y = net(x)
    >>> torch.allclose(merge_adapters(net)(x), y, atol=1e-6)
    True
    >>> type(net[0]).__name__, net[0].out_channels
    ('Conv2d', 4)
"""

from ._artifact import artifact_tensors, base_checksum, load_artifact, save_artifact
from ._config import AdapterConfig, SPLoPAConfig, SPLoRAConfig, SPPaRAConfig
from ._layer import AdapterLayer
from ._model import (
    adapter_layers,
    add_adapters,
    find_targets,
    merge_adapters,
    unmerge_adapters,
)
from ._splopa import PrototypeBank, SPLoPALayer, prune_blocks
from ._splora import SPLoRALayer, SPLoRAMultiheadAttention
from ._sppara import SPPaRALayer

__all__ = [
    "AdapterConfig",
    "AdapterLayer",
    "PrototypeBank",
    "SPLoPAConfig",
    "SPLoPALayer",
    "SPLoRAConfig",
    "SPLoRALayer",
    "SPLoRAMultiheadAttention",
    "SPPaRAConfig",
    "SPPaRALayer",
    "adapter_layers",
    "add_adapters",
    "artifact_tensors",
    "base_checksum",
    "find_targets",
    "load_artifact",
    "merge_adapters",
    "prune_blocks",
    "save_artifact",
    "unmerge_adapters",
]
