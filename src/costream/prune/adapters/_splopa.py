"""SPLoPA: Structured Pruning Low-rank PHM Adapter (Hedegaard et al., arXiv 2211.10155).

For a linear weight ``W`` split into ``b x b`` blocks, the update is a sum of Kronecker
products ``sum_k S_k kron P_k``: ``P_k = U_k V_k`` are ``num_prototypes`` rank-``r`` block
prototypes shared by every adapted layer (one bank per :func:`add_adapters` call), ``S_k`` the
layer's per-block scalings. Block pruning sets a block mask ``M``; the layer computes
``(W + update) * M`` and a task stores only the scalings of kept blocks (``num_prototypes`` per
block), the mask (one bit per block) and the shared bank once.

Merging writes the masked weight into a dense linear layer of the same shape (the zero blocks are
structured sparsity, not a smaller dense shape); it cannot be undone once blocks are masked.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from ._config import SPLoPAConfig
from ._layer import AdapterLayer, Target, register_adapter_layer, uniform_


def lopa_update(scales: Tensor, u: Tensor, v: Tensor) -> Tensor:
    """The update ``sum_k kron(S_k, U_k V_k)``: ``(R b, C b)``.

    Shape:
        scales ``(K, R, C)``, ``u`` ``(K, b, r)``, ``v`` ``(K, r, b)``.

    Example:
        >>> import torch
        >>> s, u, v = torch.ones(1, 1, 2), torch.ones(1, 2, 1), torch.ones(1, 1, 2)
        >>> lopa_update(s, u, v).shape
        torch.Size([2, 4])
    """
    protos = u @ v
    _, rows, cols = scales.shape
    b = protos.shape[-1]
    return torch.einsum("kij,kpq->ipjq", scales, protos).reshape(rows * b, cols * b)


class PrototypeBank(nn.Module):
    """``num_prototypes`` low-rank ``block_size``-square prototypes ``U_k V_k`` (shared).

    Example:
        >>> import torch
        >>> from costream.prune.adapters import PrototypeBank, SPLoPAConfig
        >>> bank = PrototypeBank(SPLoPAConfig(), torch.float32, torch.device("cpu"))
        >>> isinstance(bank, torch.nn.Module)
        True
    """

    def __init__(self, config: SPLoPAConfig, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        k, b, r = config.num_prototypes, config.block_size, config.rank
        std = 1.0 / math.sqrt(math.sqrt(b * r))
        self.U = nn.Parameter(torch.randn(k, b, r, dtype=dtype, device=device) * std)
        self.V = nn.Parameter(torch.randn(k, r, b, dtype=dtype, device=device) * std)


@register_adapter_layer
class SPLoPALayer(AdapterLayer):
    """SPLoPA around a ``Linear`` whose dimensions are multiples of ``block_size``.

    Args:
        base_layer: the linear layer to adapt.
        config: a :class:`SPLoPAConfig`.
        bank: the shared :class:`PrototypeBank` (a new one if ``None``).

    Shape:
        as the base layer.

    Example:
        >>> import torch
        >>> cfg = SPLoPAConfig(block_size=4, num_prototypes=3, init_scale=0.1)
        >>> layer = SPLoPALayer(torch.nn.Linear(8, 12), cfg)
        >>> tuple(layer.block_mask.shape)  # (12 / 4, 8 / 4) blocks
        (3, 2)
        >>> layer.prune_blocks(0.5)
        >>> int(layer.block_mask.sum())
        3
    """

    method = "splopa"
    channel_prunable = False

    def _create(self, t: Target, core: tuple[int, int], weight: Tensor, config: Any,
                bank: PrototypeBank | None = None, **shared: Any) -> None:
        b = config.block_size
        n_out, n_in = core
        if n_out % b or n_in % b:
            raise ValueError(f"SPLoPA needs layer dimensions that are multiples of block_size "
                             f"{b}, got {n_out} x {n_in}")
        self.bank = bank if bank is not None else PrototypeBank(config, weight.dtype,
                                                               weight.device)
        s = torch.empty(config.num_prototypes, n_out // b, n_in // b, dtype=weight.dtype,
                        device=weight.device)
        self.lopa_S = nn.Parameter(uniform_(s, config))
        self.register_buffer("block_mask", torch.ones(n_out // b, n_in // b, dtype=torch.bool,
                                                      device=weight.device))
        self.block_size = b

    def _mask(self) -> Tensor:
        b = self.block_size
        return self.block_mask.repeat_interleave(b, 0).repeat_interleave(b, 1)

    def delta(self, t: Target) -> Tensor:
        return lopa_update(self.lopa_S * self.block_mask, self.bank.U, self.bank.V)

    def adapted(self, t: Target, weight: Tensor) -> Tensor:
        return (weight + self.delta(t)) * self._mask()

    def _slice(self, t: Target, side: str, keep: Tensor) -> None:
        raise NotImplementedError("SPLoPA prunes blocks, not channels")

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged and not bool(self.block_mask.all()):
            raise RuntimeError("SPLoPA merge zeroed the masked blocks of the base weight; "
                               "it cannot be undone")
        super().unmerge()

    @torch.no_grad()
    def prune_blocks(self, density: float) -> None:
        """Keep the ``density`` fraction of blocks with the largest L2 norm (adapted weight)."""
        if not 0.0 < density <= 1.0:
            raise ValueError(f"density must be in (0, 1], got {density}")
        if self.merged:
            raise RuntimeError("unmerge before pruning blocks")
        b = self.block_size
        w = self.adapted(self.targets[0], self.base_weight(self.targets[0]))
        rows, cols = self.block_mask.shape
        norms = w.reshape(rows, b, cols, b).square().sum((1, 3)).flatten()
        norms[~self.block_mask.flatten()] = -1.0
        keep = max(1, math.ceil(density * rows * cols - 1e-9))
        mask = torch.zeros(rows * cols, dtype=torch.bool, device=w.device)
        mask[torch.argsort(norms, descending=True, stable=True)[:keep]] = True
        self.block_mask.copy_(mask.view(rows, cols) & self.block_mask)

    # ------------------------------------------------------------------ artifact
    def export_state(self) -> dict[str, Tensor]:
        """Block mask and the scalings of kept blocks only (the shared bank is separate)."""
        return {"block_mask": self.block_mask.detach().clone(),
                "lopa_S": self.lopa_S.detach()[:, self.block_mask].clone()}

    @torch.no_grad()
    def import_state(self, state: dict[str, Tensor], where: str) -> None:
        """Inverse of :meth:`export_state`; ``where`` names the layer in errors."""
        _expect_keys(state, {"block_mask", "lopa_S"}, where)
        mask = state["block_mask"]
        if mask.shape != self.block_mask.shape:
            raise ValueError(f"shape mismatch for {where}.block_mask: artifact "
                             f"{tuple(mask.shape)}, model {tuple(self.block_mask.shape)}")
        s = state["lopa_S"]
        want = (self.lopa_S.shape[0], int(mask.sum()))
        if tuple(s.shape) != want:
            raise ValueError(f"shape mismatch for {where}.lopa_S: artifact {tuple(s.shape)}, "
                             f"model {want}")
        self.block_mask.copy_(mask)
        self.lopa_S.zero_()
        self.lopa_S[:, mask] = s.to(self.lopa_S)

    def shared_modules(self) -> dict[str, nn.Module]:
        """Submodules shared with other layers (stored once per artifact)."""
        return {"bank": self.bank}


def _expect_keys(state: dict[str, Tensor], keys: set[str], where: str) -> None:
    if set(state) != keys:
        raise ValueError(f"module name mismatch in {where}: artifact has {sorted(state)}, "
                         f"the model expects {sorted(keys)}")


def splopa_layer(base: nn.Module, config: SPLoPAConfig, bank: PrototypeBank | None = None,
                 **shared: Any) -> SPLoPALayer:
    """An :class:`SPLoPALayer` around ``base`` using the prototype ``bank``."""
    return SPLoPALayer(base, config, bank=bank, **shared)


def prune_blocks(model: nn.Module, density: float) -> nn.Module:
    """Block-prune every SPLoPA layer of ``model`` to ``density`` (per layer); return it.

    Example:
        >>> import torch
        >>> from costream.prune.adapters import add_adapters
        >>> net = torch.nn.Sequential(torch.nn.Linear(8, 8))
        >>> _ = add_adapters(net, SPLoPAConfig(block_size=4, num_prototypes=2))
        >>> int(prune_blocks(net, 0.25)[0].block_mask.sum())
        1
    """
    for m in model.modules():
        if isinstance(m, SPLoPALayer):
            m.prune_blocks(density)
    return model
