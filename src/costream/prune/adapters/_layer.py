"""The adapter layer base: wrap a base layer and add a trainable update to its weights.

An adapter layer holds the base layer (``base_layer``, frozen), the adapter parameters of each
adapted weight ("target") and runs the base layer with its weights replaced by the adapted ones
(:func:`torch.func.functional_call`), so Linear, ``Conv1d/2d/3d`` (continual or not) and
``MultiheadAttention`` all run their own forward. The per-method computation (the update of a
weight, how to slice adapter parameters when channels go) lives in the method files.

Adapter layers are continual modules so that continual containers keep their timing: around a
continual layer, the offline ``forward`` works unmerged, and stepping works once merged
(:meth:`AdapterLayer.merge`), when the base layer holds the adapted weights.

The Torch-Pruning pruning functions for adapter layers (``ADAPTER_PRUNERS``) prune the base layer
with Torch-Pruning's own function and slice the adapter parameters alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch_pruning as tp
from torch import Tensor, nn
from torch.func import functional_call

from ...core import CoModule, Temporal
from .._masks import refresh
from ._config import AdapterConfig

ADAPTER_PRUNERS: dict[type, tp.pruner.function.BasePruningFunc] = {}


@dataclass(frozen=True)
class Target:
    """An adapted weight of the base layer.

    ``name`` is its parameter path on the base layer, ``key`` the name used for its adapter
    parameters.
    """

    name: str
    key: str


def place_centre(core: Tensor, shape: torch.Size) -> Tensor:
    """Embed ``core`` ``(n_out, n_in)`` as the centre tap of a kernel of ``shape``.

    For a linear weight (``len(shape) == 2``) the core is the whole update. Even kernel sizes
    use index ``k // 2``.

    Example:
        >>> import torch
        >>> place_centre(torch.ones(2, 3), torch.Size([2, 3, 3]))[0, 0]
        tensor([0., 1., 0.])
    """
    if len(shape) == 2:
        return core
    full = core.new_zeros(shape)
    full[(slice(None), slice(None), *(k // 2 for k in shape[2:]))] = core
    return full


def base_kind(module: nn.Module) -> str | None:
    """The supported type name of ``module`` (``"Conv2d"``, ``"Linear"``, ...) or ``None``."""
    for cls in (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.MultiheadAttention):
        if isinstance(module, cls):
            return cls.__name__
    return None


class AdapterLayer(CoModule):
    """Base of the adapter layers; subclasses implement the per-method hooks.

    Example:
        >>> import torch
        >>> from costream.prune.adapters import AdapterLayer, SPLoRAConfig, add_adapters
        >>> net = add_adapters(torch.nn.Sequential(torch.nn.Linear(4, 3)), SPLoRAConfig(rank=2))
        >>> isinstance(net[0], AdapterLayer)
        True

    Subclasses define ``_create`` (adapter parameters of one target), ``delta`` (the update of
    one target weight, full shape) and ``_slice`` (keep rows or columns of a target's adapter
    parameters). They may override ``adapted`` (default: weight + delta).
    """

    method: ClassVar[str] = ""
    channel_prunable: ClassVar[bool] = True  # the pruner skips groups touching it otherwise
    coupled: ClassVar[bool] = False  # input and output channels are one dimension (attention)

    def __init__(self, base_layer: nn.Module, config: AdapterConfig, **shared: Any) -> None:
        super().__init__()
        kind = base_kind(base_layer)
        if kind not in config.supported_types:
            raise ValueError(f"{self.method} cannot adapt {type(base_layer).__name__}; it adapts "
                             f"{list(config.supported_types)}")
        self.base_layer = base_layer
        self.merged = False
        self.targets = self._find_targets(base_layer)
        for t in self.targets:
            w = self.base_weight(t)
            self._create(t, self.core_shape(t), w, config, **shared)

    # ------------------------------------------------------------------ per method
    def _create(self, t: Target, core: tuple[int, int], weight: Tensor, config: AdapterConfig,
                **shared: Any) -> None:
        raise NotImplementedError

    def delta(self, t: Target) -> Tensor:
        """The update of target ``t``'s weight (full weight shape)."""
        raise NotImplementedError

    def _slice(self, t: Target, side: str, keep: Tensor) -> None:
        raise NotImplementedError

    def adapted(self, t: Target, weight: Tensor) -> Tensor:
        """The weight the network uses for target ``t`` given the base ``weight``."""
        return weight + self.delta(t)

    # ------------------------------------------------------------------ targets
    @staticmethod
    def _find_targets(base: nn.Module) -> list[Target]:
        if isinstance(base, nn.MultiheadAttention):
            if not base._qkv_same_embed_dim:
                names = ["q_proj_weight", "k_proj_weight", "v_proj_weight"]
                return [*(Target(n, n) for n in names), Target("out_proj.weight", "out_proj")]
            return [Target("in_proj_weight", "in_proj"), Target("out_proj.weight", "out_proj")]
        if isinstance(base, nn.modules.conv._ConvNd) and (base.transposed or base.groups != 1):
            raise ValueError("adapters support convolutions with groups=1 and no transposition")
        return [Target("weight", "weight")]

    def base_weight(self, t: Target) -> Tensor:
        """The base layer's parameter adapted by target ``t``."""
        return self.base_layer.get_parameter(t.name)

    def core_shape(self, t: Target) -> tuple[int, int]:
        """``(n_out, n_in)`` of target ``t``'s update (input channels per group for convs)."""
        w = self.base_weight(t)
        return int(w.shape[0]), int(w.shape[1])

    def adapted_weights(self) -> dict[str, Tensor]:
        """``{parameter path on base_layer: adapted weight}`` for every target."""
        return {t.name: self.adapted(t, self.base_weight(t)) for t in self.targets}

    def adapter_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """``(name, parameter)`` of the adapter itself (everything but ``base_layer``)."""
        return [(n, p) for n, p in self.named_parameters() if not n.startswith("base_layer.")]

    # ------------------------------------------------------------------ artifact
    def shared_modules(self) -> dict[str, nn.Module]:
        """Submodules shared with other adapter layers (stored once per artifact)."""
        return {}

    def export_state(self) -> dict[str, Tensor]:
        """The tensors of this adapter a task stores (not the base, not shared modules)."""
        skip = {"base_layer", *self.shared_modules()}
        out = {}
        for name, t in [*self.named_parameters(), *self.named_buffers()]:
            if name.split(".")[0] not in skip:
                out[name] = t.detach().clone()
        return out

    @torch.no_grad()
    def import_state(self, state: dict[str, Tensor], where: str) -> None:
        """Load :meth:`export_state` output; ``where`` names the layer in errors."""
        own = self.export_state()
        if set(state) != set(own):
            raise ValueError(f"module name mismatch in {where}: artifact has {sorted(state)}, "
                             f"the model expects {sorted(own)}")
        tensors = dict([*self.named_parameters(), *self.named_buffers()])
        for name, value in state.items():
            if tuple(value.shape) != tuple(own[name].shape):
                raise ValueError(f"shape mismatch for {where}.{name}: artifact "
                                 f"{tuple(value.shape)}, model {tuple(own[name].shape)}")
            tensors[name].copy_(value)

    # ------------------------------------------------------------------ forward
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if isinstance(self.base_layer, CoModule):
            return CoModule.forward(self, *args, **kwargs)
        return self._adapted_call(args, kwargs)

    def _adapted_call(self, args: tuple, kwargs: dict) -> Any:
        if self.merged:
            return self.base_layer(*args, **kwargs)
        return functional_call(self.base_layer, self.adapted_weights(), args, kwargs)

    def _clip(self, x: Any) -> Any:
        return self._adapted_call((x,), {})

    # ------------------------------------------------------------------ merging
    @torch.no_grad()
    def merge(self) -> None:
        """Write the adapted weights into the base layer (the adapter stays, inactive)."""
        if self.merged:
            return
        new = self.adapted_weights()
        for t in self.targets:
            self.base_weight(t).copy_(new[t.name])
        self.merged = True
        refresh(self.base_layer)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge`: subtract the update from the base weights again."""
        if not self.merged:
            return
        for t in self.targets:
            self.base_weight(t).sub_(self.delta(t))
        self.merged = False
        refresh(self.base_layer)

    # ------------------------------------------------------------------ streaming
    def _streaming_base(self) -> CoModule:
        if not isinstance(self.base_layer, CoModule):
            raise TypeError(f"{type(self).__name__} wraps {type(self.base_layer).__name__}, "
                            f"which is not a continual module")
        if not self.merged:
            raise RuntimeError(
                f"{type(self).__name__} around a continual layer streams only when merged: call "
                f"costream.prune.adapters.merge_adapters(model) (or layer.merge()) first"
            )
        return self.base_layer

    def _temporal(self) -> Temporal:
        base = self.base_layer
        return base.temporal if isinstance(base, CoModule) else Temporal()

    def _input_spec(self) -> tuple[int | None, int | None]:
        base = self.base_layer
        return base._input_spec() if isinstance(base, CoModule) else (None, None)

    def _init(self, batch: int, shape: Any, device: torch.device, dtype: torch.dtype):
        return self._streaming_base()._init(batch, shape, device, dtype)

    def _step(self, x: Any, state: Any, age: Any, phase: int):
        return self._streaming_base()._step(x, state, age, phase)

    def _steps(self, x: Any, state: Any, age: Any, phase: int):
        return self._streaming_base()._steps(x, state, age, phase)

    def _flush(self, state: Any, age: Any, phase: int):
        return self._streaming_base()._flush(state, age, phase)

    def _prepare(self) -> None:
        if isinstance(self.base_layer, CoModule):
            self.base_layer._prepare()

    # ------------------------------------------------------------------ pruning
    def scoring_views(self, kind: str) -> list[tuple[Tensor, nn.Parameter, int]]:
        """Weights as used (base + update) for importance criteria; gradients on the base."""
        if not self.channel_prunable:
            return []
        return [(self.adapted(t, self.base_weight(t)).detach(), self.base_weight(t),
                 0 if kind == "out" else 1) for t in self.targets]

    def prune_channels(self, kind: str, removed: list[int]) -> None:
        """Remove ``kind`` (``"out"``/``"in"``) channels ``removed`` of base and adapter."""
        if not self.channel_prunable:
            raise NotImplementedError(f"{type(self).__name__} does not support channel pruning")
        pruner = tp.pruner.function.PrunerBox[tp.ops.module2type(self.base_layer)]
        n = (pruner.get_out_channels if kind == "out" else pruner.get_in_channels)(
            self.base_layer)
        (pruner.prune_out_channels if kind == "out" else pruner.prune_in_channels)(
            self.base_layer, removed)
        keep = torch.ones(n, dtype=torch.bool)
        keep[torch.as_tensor(removed, dtype=torch.long)] = False
        keep = keep.nonzero().flatten()
        for t in self.targets:
            self._slice(t, kind, keep)


def _base_pruner(layer: AdapterLayer) -> tp.pruner.function.BasePruningFunc:
    return tp.pruner.function.PrunerBox[tp.ops.module2type(layer.base_layer)]


class _AdapterPruner(tp.pruner.function.BasePruningFunc):
    """Torch-Pruning functions for an adapter layer with separate input/output channels."""

    def prune_out_channels(self, layer: AdapterLayer, idxs: Any) -> AdapterLayer:
        layer.prune_channels("out", list(idxs))
        return layer

    def prune_in_channels(self, layer: AdapterLayer, idxs: Any) -> AdapterLayer:
        layer.prune_channels("in", list(idxs))
        return layer

    def get_out_channels(self, layer: AdapterLayer) -> int:
        return _base_pruner(layer).get_out_channels(layer.base_layer)

    def get_in_channels(self, layer: AdapterLayer) -> int:
        return _base_pruner(layer).get_in_channels(layer.base_layer)


class _CoupledAdapterPruner(_AdapterPruner):
    """Torch-Pruning functions for an adapter layer whose input and output are one dimension."""

    def prune_out_channels(self, layer: AdapterLayer, idxs: Any) -> AdapterLayer:
        layer.prune_channels("out", list(idxs))
        return layer

    prune_in_channels = prune_out_channels


def register_adapter_layer(cls: type[AdapterLayer]) -> type[AdapterLayer]:
    """Give the adapter layer class Torch-Pruning pruning functions (class decorator)."""
    ADAPTER_PRUNERS[cls] = _CoupledAdapterPruner() if cls.coupled else _AdapterPruner()
    return cls


def uniform_(t: Tensor, config: AdapterConfig) -> Tensor:
    """Initialise ``t`` as the config says: uniform in ``+-init_scale`` or zeros."""
    with torch.no_grad():
        if config.init == "zeros" or config.init_scale == 0:
            return t.zero_()
        return t.uniform_(-config.init_scale, config.init_scale)
