"""Channel masks: which channels of the base network a pruned (derived) network kept.

Whenever the pruner removes channels of a layer, the layer records, per dimension (``"out"`` or
``"in"``), the base width and the indices of the base channels it still has. The record
survives further pruning steps, adapters being added or merged, and ``copy.deepcopy``.

Masks are reported per module (by its name in the network) as boolean vectors over the base
channels, ``True`` where a channel is kept. Replaying them onto a fresh copy of the base with
Torch-Pruning's per-layer pruning functions (:func:`apply_masks`) rebuilds the pruned shapes.
Layers with an intra-layer coupling (batch norm, depthwise conv, attention embedding) record
only ``"out"``: pruning them prunes both sides at once.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch_pruning as tp
from torch import Tensor, nn

_ATTR = "_costream_kept"
KINDS = ("out", "in")


def layer_pruner(module: nn.Module) -> tp.pruner.function.BasePruningFunc | None:
    """The Torch-Pruning pruning function set for ``module`` (costream adapters included)."""
    from .adapters._layer import ADAPTER_PRUNERS

    custom = ADAPTER_PRUNERS.get(type(module))
    if custom is not None:
        return custom
    return tp.pruner.function.PrunerBox.get(tp.ops.module2type(module))


def channels(module: nn.Module, kind: str) -> int | None:
    """Current number of ``kind`` channels of ``module`` (``None`` if not prunable)."""
    pruner = layer_pruner(module)
    if pruner is None:
        return None
    return pruner.get_out_channels(module) if kind == "out" else pruner.get_in_channels(module)


def record_removal(module: nn.Module, kind: str, removed: list[int]) -> None:
    """Note that channels ``removed`` (current positions) of ``module`` are about to go."""
    kept: dict[str, tuple[int, Tensor]] = getattr(module, _ATTR, None) or {}
    if kind not in kept:
        n = channels(module, kind)
        if n is None:
            return
        kept[kind] = (n, torch.arange(n))
    base, idx = kept[kind]
    keep = torch.ones(len(idx), dtype=torch.bool)
    keep[torch.as_tensor(removed, dtype=torch.long)] = False
    kept[kind] = (base, idx[keep])
    setattr(module, _ATTR, kept)


def transfer_record(src: nn.Module, dst: nn.Module) -> None:
    """Move the kept-channel record of ``src`` to ``dst`` (a wrapper replacing it, or back)."""
    kept = getattr(src, _ATTR, None)
    if kept:
        setattr(dst, _ATTR, kept)
        delattr(src, _ATTR)


def kept_masks(model: nn.Module) -> dict[str, dict[str, Tensor]]:
    """``{module name: {"out"|"in": bool mask over base channels}}`` of every pruned layer.

    Example:
        >>> import torch
        >>> from costream.prune import prune
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> _ = prune(net, torch.randn(1, 4), "l1", density=0.5)
        >>> {name: {k: int(m.sum()) for k, m in d.items()} for name, d in kept_masks(net).items()}
        {'0': {'out': 4}, '2': {'in': 4}}
    """
    out: dict[str, dict[str, Tensor]] = {}
    for name, module in model.named_modules():
        kept = getattr(module, _ATTR, None)
        if not kept:
            continue
        entry = {}
        for kind in KINDS:
            if kind in kept:
                base, idx = kept[kind]
                mask = torch.zeros(base, dtype=torch.bool)
                mask[idx] = True
                entry[kind] = mask
        out[name] = entry
    return out


def apply_masks(model: nn.Module, masks: Mapping[str, Mapping[str, Tensor]]) -> nn.Module:
    """Prune ``model`` (in place) to the channels ``masks`` keep; see :func:`kept_masks`.

    Every parameter keeps its ``requires_grad`` flag (frozen base weights stay frozen).

    Raises:
        ValueError: a module is missing, cannot be pruned, or a mask's length differs from the
            module's current width.

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 1))
        >>> keep = torch.tensor([True, False, True, False])
        >>> _ = apply_masks(net, {"0": {"out": keep}, "1": {"in": keep}})
        >>> net[0].out_features, net[1].in_features
        (2, 2)
    """
    modules = dict(model.named_modules())
    # Torch-Pruning replaces pruned parameters by new ones, which require grad: keep the flags
    # (an adapted model's frozen base weights stay frozen)
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    for name, entry in masks.items():
        if name not in modules:
            raise ValueError(f"mask for module {name!r}, which the model does not have")
        module = modules[name]
        pruner = layer_pruner(module)
        if pruner is None:
            raise ValueError(f"mask for module {name!r} ({type(module).__name__}), which has no "
                             f"channel pruning function")
        for kind, mask in entry.items():
            if kind not in KINDS:
                raise ValueError(f"mask kind must be 'out' or 'in', got {kind!r} for {name!r}")
            mask = torch.as_tensor(mask, dtype=torch.bool)
            width = channels(module, kind)
            if width != mask.numel():
                raise ValueError(
                    f"shape mismatch: the {kind!r} mask of module {name!r} covers {mask.numel()} "
                    f"channels but the module has {width}"
                )
            if not bool(mask.any()):
                raise ValueError(f"the {kind!r} mask of module {name!r} keeps no channel")
            removed = (~mask).nonzero().flatten().tolist()
            if removed:
                record_removal(module, kind, removed)
                fn = pruner.prune_out_channels if kind == "out" else pruner.prune_in_channels
                fn(module, removed)
    for name, p in model.named_parameters():
        p.requires_grad_(flags.get(name, p.requires_grad))
    refresh(model)
    return model


def refresh(model: nn.Module) -> None:
    """After pruning: drop cached derived kernels and running streams of continual modules.

    Continual convolutions cache a re-laid-out kernel keyed on the weight tensor's storage and
    version; a pruned weight may reuse a freed storage, so every cache is invalidated. Streams
    are reset because their state has the old widths.
    """
    from ..core import CoModule
    from ..modules._cache import DerivedCache

    for m in model.modules():
        for value in vars(m).values():
            if isinstance(value, DerivedCache):
                value.invalidate()
        if isinstance(m, CoModule):
            m._prepare()
            m.reset_state()
