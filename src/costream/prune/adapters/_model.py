"""Adding adapters to a network, merging them away, and finding them again."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from torch import nn

from .._masks import refresh, transfer_record
from ._config import AdapterConfig, SPLoPAConfig
from ._layer import AdapterLayer, base_kind
from ._splopa import PrototypeBank, splopa_layer
from ._splora import splora_layer
from ._sppara import sppara_layer

_BUILDERS: dict[str, Callable[..., AdapterLayer]] = {
    "splora": splora_layer,
    "sppara": sppara_layer,
    "splopa": splopa_layer,
}
_STATE_ATTR = "_costream_adapters"


def _matches(name: str, spec: list[str] | str | None) -> bool:
    if spec is None:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == s or name.endswith("." + s) for s in spec)


def _supported(module: nn.Module, config: AdapterConfig) -> bool:
    if base_kind(module) not in config.types:
        return False
    if isinstance(module, nn.modules.conv._ConvNd):
        return module.groups == 1 and not module.transposed
    if isinstance(config, SPLoPAConfig) and isinstance(module, nn.Linear):
        b = config.block_size
        return module.in_features % b == 0 and module.out_features % b == 0
    return True


def find_targets(model: nn.Module, config: AdapterConfig) -> list[str]:
    """Names of the modules :func:`add_adapters` would wrap, in ``named_modules`` order.

    Example:
        >>> import torch
        >>> from costream.prune.adapters import SPLoRAConfig
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten(),
        ...                           torch.nn.Linear(36, 2))
        >>> find_targets(net, SPLoRAConfig(modules_to_save=["2"]))
        ['0']
    """
    names: list[str] = []
    inside: list[str] = []
    explicit = isinstance(config.target_modules, list)
    for name, module in model.named_modules():
        if not name or any(name.startswith(p + ".") for p in inside):
            continue
        if isinstance(module, (AdapterLayer, nn.MultiheadAttention)):
            inside.append(name)  # never adapt the internals of attention or adapters
        if _matches(name, config.modules_to_save):
            inside.append(name)
            continue
        if config.target_modules is not None and not _matches(name, config.target_modules):
            continue
        if base_kind(module) is None:
            continue
        if not _supported(module, config):
            if explicit and base_kind(module) in config.types:
                raise ValueError(f"{config.method} cannot adapt {name!r} "
                                 f"({type(module).__name__}: grouped/transposed convolution or "
                                 f"dimensions not a multiple of the block size)")
            continue
        names.append(name)
        inside.append(name)
    if explicit:
        missing = [s for s in config.target_modules if not any(_matches(n, [s]) for n in names)]
        if missing:
            raise ValueError(f"target_modules {missing} match no adaptable module")
    return names


def add_adapters(model: nn.Module, config: AdapterConfig) -> nn.Module:
    """Wrap the targeted layers of ``model`` (in place) in adapters; freeze everything else.

    Trainable afterwards: the adapter parameters, the biases of adapted layers (if
    ``config.train_bias``) and all parameters of ``config.modules_to_save``.

    Example:
        >>> import torch
        >>> from costream.prune.adapters import SPLoRAConfig
        >>> net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(),
        ...                           torch.nn.Linear(8, 2))
        >>> _ = add_adapters(net, SPLoRAConfig(rank=2, modules_to_save=["2"]))
        >>> sorted(n for n, p in net.named_parameters() if p.requires_grad)
        ['0.base_layer.bias', '0.lora_A.weight', '0.lora_B.weight', '2.bias', '2.weight']
    """
    if adapter_layers(model):
        raise ValueError("the model already has adapters; merge_adapters(model) first")
    names = find_targets(model, config)
    if not names:
        raise ValueError(f"{config.method}: no module of the model matches the config")
    shared: dict[str, Any] = {}
    if isinstance(config, SPLoPAConfig):
        w = model.get_submodule(names[0]).weight
        shared["bank"] = PrototypeBank(config, w.dtype, w.device)
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        base = model.get_submodule(name)
        layer = _BUILDERS[config.method](base, config, **shared)
        layer.train(base.training)
        transfer_record(base, layer)
        _replace(model, name, layer)
        for _, p in layer.adapter_parameters():
            p.requires_grad_(True)
        if config.train_bias:
            for pname, p in base.named_parameters():
                if pname.rsplit(".", 1)[-1] in ("bias", "in_proj_bias"):
                    p.requires_grad_(True)
    saved = [n for n, _ in model.named_modules() if n and _matches(n, config.modules_to_save)]
    for name in saved:
        for p in model.get_submodule(name).parameters():
            p.requires_grad_(True)
    setattr(model, _STATE_ATTR, {"config": config, "modules_to_save": saved, "merged": False})
    refresh(model)
    return model


def adapter_layers(model: nn.Module) -> dict[str, AdapterLayer]:
    """``{name: adapter layer}`` of ``model``.

    Example:
        >>> import torch
        >>> from costream.prune.adapters import SPPaRAConfig
        >>> net = add_adapters(torch.nn.Sequential(torch.nn.Conv1d(2, 2, 3)), SPPaRAConfig())
        >>> list(adapter_layers(net))
        ['0']
    """
    return {n: m for n, m in model.named_modules() if isinstance(m, AdapterLayer)}


def adapter_state(model: nn.Module) -> dict[str, Any] | None:
    """What :func:`add_adapters` recorded on ``model`` (config, saved modules), if anything."""
    return getattr(model, _STATE_ATTR, None)


def merge_adapters(model: nn.Module, unload: bool = True) -> nn.Module:
    """Merge every adapter into its base layer; with ``unload`` replace it by that layer.

    The result holds plain (continual or ``torch.nn``) dense layers of the pruned shapes and
    streams like the network it came from. Without ``unload`` the adapters stay, merged, and
    :func:`unmerge_adapters` can undo it.

    Example:
        >>> import torch
        >>> from costream.prune.adapters import SPLoRAConfig
        >>> net = add_adapters(torch.nn.Sequential(torch.nn.Linear(4, 4)), SPLoRAConfig(rank=1))
        >>> type(merge_adapters(net)[0]).__name__
        'Linear'
    """
    for name, layer in adapter_layers(model).items():
        layer.merge()
        if unload:
            base = layer.base_layer
            transfer_record(layer, base)
            _replace(model, name, base)
    state = adapter_state(model)
    if state is not None:
        state["merged"] = True
    refresh(model)
    return model


def unmerge_adapters(model: nn.Module) -> nn.Module:
    """Undo ``merge_adapters(model, unload=False)``.

    Example:
        >>> import torch
        >>> from costream.prune.adapters import SPLoRAConfig
        >>> net = add_adapters(torch.nn.Sequential(torch.nn.Linear(3, 3)), SPLoRAConfig())
        >>> w = net[0].base_layer.weight.detach().clone()
        >>> _ = unmerge_adapters(merge_adapters(net, unload=False))
        >>> torch.allclose(net[0].base_layer.weight, w)
        True
    """
    for layer in adapter_layers(model).values():
        layer.unmerge()
    state = adapter_state(model)
    if state is not None:
        state["merged"] = False
    refresh(model)
    return model


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, module)
