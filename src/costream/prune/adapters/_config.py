"""Adapter configurations: one validated dataclass per method, round-tripping through JSON.

Which layers get an adapter:

* ``target_modules``: a list of module names (a name matches itself and any module whose dotted
  name ends with ``"." + name``), or one string used as a regular expression that must match
  the full module name; ``None`` means every module of a supported type;
* ``target_types``: type names among the method's supported ones (``"Linear"``, ``"Conv1d"``,
  ``"Conv2d"``, ``"Conv3d"``, ``"MultiheadAttention"``); ``None`` means all of them. Continual
  layers match their ``torch.nn`` type (``costream.Conv3d`` is a ``"Conv3d"``);
* ``modules_to_save``: modules trained in full and stored with the task (a new head), given
  like ``target_modules``; they never get an adapter.

Layers matched only by type or pattern are skipped when the method cannot adapt them (grouped
or transposed convolutions, linears inside attention); naming one explicitly is an error.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar

CONV_TYPES = ("Conv1d", "Conv2d", "Conv3d")
_CONFIGS: dict[str, type[AdapterConfig]] = {}


def _check_names(value: Any, field: str) -> None:
    if value is None:
        return
    if isinstance(value, str):
        try:
            re.compile(value)
        except re.error as e:
            raise ValueError(f"{field} {value!r} is not a valid regular expression: {e}") from None
        return
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"{field} must be None, a regex string or a list of module names, "
                         f"got {value!r}")


@dataclass
class AdapterConfig:
    """Fields shared by every adapter method; use a subclass (:class:`SPLoRAConfig`, ...).

    Example:
        >>> from costream.prune.adapters import AdapterConfig, SPLoRAConfig
        >>> isinstance(SPLoRAConfig(rank=4), AdapterConfig)
        True
    """

    method: ClassVar[str] = ""
    supported_types: ClassVar[tuple[str, ...]] = ()

    target_modules: list[str] | str | None = None
    target_types: list[str] | None = None
    modules_to_save: list[str] | str | None = None
    train_bias: bool = True
    init: str = "tiny"
    init_scale: float = 1e-4

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.method:
            _CONFIGS[cls.method] = cls

    def __post_init__(self) -> None:
        _check_names(self.target_modules, "target_modules")
        _check_names(self.modules_to_save, "modules_to_save")
        if self.target_types is not None:
            if not isinstance(self.target_types, list) or not self.target_types:
                raise ValueError(f"target_types must be None or a non-empty list, "
                                 f"got {self.target_types!r}")
            bad = [t for t in self.target_types if t not in self.supported_types]
            if bad:
                raise ValueError(f"{self.method} adapts {list(self.supported_types)}, "
                                 f"not {bad}")
        if self.init not in ("tiny", "zeros"):
            raise ValueError(f"init must be 'tiny' or 'zeros', got {self.init!r}")
        if not isinstance(self.init_scale, (int, float)) or self.init_scale < 0:
            raise ValueError(f"init_scale must be a number >= 0, got {self.init_scale!r}")
        if not isinstance(self.train_bias, bool):
            raise ValueError(f"train_bias must be a bool, got {self.train_bias!r}")

    @property
    def types(self) -> tuple[str, ...]:
        """The type names this config adapts."""
        return tuple(self.target_types) if self.target_types else self.supported_types

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict including ``"method"``."""
        return {"method": self.method, **asdict(self)}

    def to_json(self) -> str:
        """The config as a JSON object (``AdapterConfig.from_json`` reads it back)."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @staticmethod
    def from_json(text: str | dict[str, Any]) -> AdapterConfig:
        """The config of the method named in the JSON object's ``"method"`` field."""
        data = json.loads(text) if isinstance(text, str) else dict(text)
        method = data.pop("method", None)
        if method not in _CONFIGS:
            raise ValueError(f"unknown adapter method {method!r}; known: {sorted(_CONFIGS)}")
        cls = _CONFIGS[method]
        names = {f.name for f in fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown {method} config fields {sorted(unknown)}")
        return cls(**data)


def _positive_int(value: Any, name: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


@dataclass
class SPLoRAConfig(AdapterConfig):
    """Structured Pruning Low-rank Adapter: ``W' = W + B A`` on the kernel's centre tap.

    ``A`` (``rank x n_in``) is Kaiming-uniform; ``B`` (``n_out x rank``) is uniform in
    ``+-init_scale`` (``init="tiny"``) or zero (``init="zeros"``). Hedegaard et al.,
    "Structured Pruning Adapters", arXiv 2211.10155.

    Example:
        >>> cfg = SPLoRAConfig(rank=4, target_types=["Conv2d"], modules_to_save=["head"])
        >>> AdapterConfig.from_json(cfg.to_json()) == cfg
        True
    """

    method: ClassVar[str] = "splora"
    supported_types: ClassVar[tuple[str, ...]] = ("Linear", *CONV_TYPES, "MultiheadAttention")
    rank: int = 8

    def __post_init__(self) -> None:
        super().__post_init__()
        _positive_int(self.rank, "rank")


@dataclass
class SPPaRAConfig(AdapterConfig):
    """Structured Pruning Parallel Residual Adapter: ``W'[:, :, centre] += P`` for convolutions.

    ``P`` (``n_out x n_in / groups``) is uniform in ``+-init_scale`` or zero.

    Example:
        >>> SPPaRAConfig(init="zeros").types
        ('Conv1d', 'Conv2d', 'Conv3d')
    """

    method: ClassVar[str] = "sppara"
    supported_types: ClassVar[tuple[str, ...]] = CONV_TYPES


@dataclass
class SPLoPAConfig(AdapterConfig):
    """Structured Pruning Low-rank PHM Adapter for linear layers with block masks.

    ``W' = (W + sum_k S_k kron (U_k V_k)) * M``: ``num_prototypes`` low-rank ``block_size``-square
    prototypes ``U_k V_k`` shared by every adapted layer, per-layer block scalings ``S_k`` and a
    block mask ``M`` that block pruning sets. Both layer dimensions must be multiples of
    ``block_size``.

    Example:
        >>> SPLoPAConfig(block_size=4, num_prototypes=8).rank
        1
    """

    method: ClassVar[str] = "splopa"
    supported_types: ClassVar[tuple[str, ...]] = ("Linear",)
    num_prototypes: int = 64
    block_size: int = 32
    rank: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        _positive_int(self.num_prototypes, "num_prototypes")
        _positive_int(self.block_size, "block_size")
        _positive_int(self.rank, "rank")
