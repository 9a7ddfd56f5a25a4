"""Importance criteria: small callables that score the channels of a pruning group.

A Torch-Pruning group lists every layer dimension coupled to one set of channels (the output
channels of a conv, the batch norm after it, the input channels of the next conv, ...). A
criterion computes an element-wise saliency for each weight tensor in the group, averages it per
channel along the coupled dimension, normalises each tensor's per-channel scores by their mean
(so a batch-norm scale and a conv kernel weigh the same) and averages over the group.

Saliencies:

* ``l1`` / ``l2``: ``|w|`` / ``w^2`` (magnitude pruning);
* ``taylor``: ``|w * g|`` with ``g`` the gradient summed over calibration batches (first-order
  Taylor expansion of the loss change when a weight is removed);
* ``fisher``: ``w^2 * sum_b g_b^2 / 2``, the diagonal empirical Fisher approximation of the
  Hessian in the optimal-brain-damage saliency (squared gradients accumulated per batch);
* ``random``: uniform random scores (a baseline).

Gradient criteria need :meth:`costream.prune.Pruner.calibrate` (or :meth:`Criterion.observe`
after each ``backward``) before scoring.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

View = tuple[Tensor, nn.Parameter | None, int]


def weight_views(module: nn.Module, kind: str) -> list[View]:
    """``(value, parameter, dim)`` triples whose ``dim`` indexes the channels of ``kind``.

    ``kind`` is ``"out"`` or ``"in"``. ``value`` is the weight as the network uses it (for an
    adapter layer: base weight plus adapter update); gradients are looked up on ``parameter``.
    Modules without prunable weights give an empty list.
    """
    views = getattr(module, "scoring_views", None)
    if views is not None:
        return views(kind)
    if isinstance(module, nn.modules.conv._ConvNd):
        w = module.weight
        if kind == "out":
            return [(w, w, 1 if module.transposed else 0)]
        depthwise = module.groups == module.out_channels == module.in_channels
        if module.groups == 1 or depthwise:
            return [(w, w, 0 if (module.transposed or depthwise) else 1)]
        return []
    if isinstance(module, nn.Linear):
        return [(module.weight, module.weight, 0 if kind == "out" else 1)]
    if isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)):
        w = getattr(module, "weight", None)
        return [] if w is None or w.dim() != 1 else [(w, w, 0)]
    return []


def pruning_kind(handler: Any) -> str:
    """``"out"`` or ``"in"``: which side a Torch-Pruning handler prunes.

    Layers whose input and output are one dimension (batch norm, depthwise conv) use their
    ``prune_out_channels`` for both sides, so they count as ``"out"``.
    """
    return "out" if getattr(handler, "__name__", "") == "prune_out_channels" else "in"


def per_channel(saliency: Tensor, dim: int) -> Tensor:
    """Mean of an element-wise ``saliency`` over every dimension but ``dim``."""
    return saliency.detach().movedim(dim, 0).reshape(saliency.shape[dim], -1).mean(1)


class Criterion:
    """Base class: ``criterion(group)`` returns one score per channel of the group's root.

    Example:
        >>> from costream.prune import CRITERIA, Criterion
        >>> sorted(CRITERIA)  # the built-in criteria by name
        ['fisher', 'l1', 'l2', 'random', 'taylor']
        >>> isinstance(CRITERIA["l1"](), Criterion)
        True

    Subclasses define :meth:`saliency` (element-wise, same shape as the weight). Gradient
    criteria set ``needs_gradients`` and read the statistics gathered by :meth:`observe`.
    """

    name: ClassVar[str] = "criterion"
    needs_gradients: ClassVar[bool] = False

    def __init__(self) -> None:
        self._grad_sum: dict[nn.Parameter, Tensor] = {}
        self._grad_sq: dict[nn.Parameter, Tensor] = {}
        self.batches = 0

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    # ------------------------------------------------------------------ statistics
    def reset(self) -> None:
        """Forget the gradient statistics (parameters change shape when a layer is pruned)."""
        self._grad_sum.clear()
        self._grad_sq.clear()
        self.batches = 0

    @torch.no_grad()
    def observe(self, model: nn.Module) -> None:
        """Accumulate the gradients now held by ``model``'s parameters (call after backward)."""
        if not self.needs_gradients:
            return
        for p in model.parameters():
            if p.grad is None:
                continue
            g = p.grad.detach()
            if p in self._grad_sum:
                self._grad_sum[p] += g
                self._grad_sq[p] += g * g
            else:
                self._grad_sum[p] = g.clone()
                self._grad_sq[p] = g * g
        self.batches += 1

    def _stats(self, param: nn.Parameter | None) -> tuple[Tensor, Tensor]:
        if param is None or param not in self._grad_sum:
            raise ValueError(
                f"criterion {self.name!r} needs gradient statistics: call "
                f"Pruner.calibrate(batches, loss_fn) (or criterion.observe(model) after each "
                f"backward) before pruning"
            )
        return self._grad_sum[param], self._grad_sq[param]

    # ------------------------------------------------------------------ scoring
    def saliency(self, value: Tensor, param: nn.Parameter | None) -> Tensor:
        """Element-wise saliency of the weight ``value`` (gradients looked up on ``param``)."""
        raise NotImplementedError

    def __call__(self, group: Any) -> Tensor:
        n = len(group[0].idxs)
        total = torch.zeros(n, dtype=torch.float64)
        count = torch.zeros(n, dtype=torch.float64)
        for item in group:
            module = item.dep.target.module
            if not isinstance(module, nn.Module) or not item.idxs:
                continue
            kind = pruning_kind(item.dep.handler)
            idxs = torch.as_tensor(item.idxs, dtype=torch.long)
            roots = torch.as_tensor(item.root_idxs, dtype=torch.long)
            for value, param, dim in weight_views(module, kind):
                score = per_channel(self.saliency(value, param), dim).double().cpu()
                mean = score.mean()
                score = score / mean if mean > 0 else torch.ones_like(score)
                total.index_add_(0, roots, score[idxs])
                count.index_add_(0, roots, torch.ones(len(roots), dtype=torch.float64))
        return total / count.clamp(min=1.0)


class Magnitude(Criterion):
    """Weight magnitude: ``|w|^p`` with ``p`` 1 (``l1``) or 2 (``l2``).

    Example:
        >>> import torch
        >>> Magnitude(1).saliency(torch.tensor([-2.0, 1.0]), None)
        tensor([2., 1.])
    """

    def __init__(self, p: int = 1) -> None:
        super().__init__()
        if p not in (1, 2):
            raise ValueError(f"magnitude criterion supports p=1 or p=2, got {p}")
        self.p = p
        self.name = f"l{p}"

    def __repr__(self) -> str:
        return f"Magnitude(p={self.p})"

    def saliency(self, value: Tensor, param: nn.Parameter | None) -> Tensor:
        return value.detach().abs() if self.p == 1 else value.detach().square()


class Taylor(Criterion):
    """First-order Taylor saliency ``|w * g|`` with ``g`` summed over calibration batches.

    Example:
        >>> import torch
        >>> lin = torch.nn.Linear(3, 2)
        >>> lin(torch.randn(4, 3)).sum().backward()
        >>> crit = Taylor()
        >>> crit.observe(lin)
        >>> crit.saliency(lin.weight, lin.weight).shape
        torch.Size([2, 3])
    """

    name = "taylor"
    needs_gradients = True

    def saliency(self, value: Tensor, param: nn.Parameter | None) -> Tensor:
        g, _ = self._stats(param)
        return (value.detach() * g).abs()


class Fisher(Criterion):
    """Diagonal empirical-Fisher saliency ``w^2 * sum_b g_b^2 / 2`` (squared batch gradients).

    Example:
        >>> import torch
        >>> lin = torch.nn.Linear(3, 2)
        >>> crit = Fisher()
        >>> for _ in range(2):
        ...     lin.zero_grad()
        ...     lin(torch.randn(4, 3)).sum().backward()
        ...     crit.observe(lin)
        >>> crit.batches
        2
    """

    name = "fisher"
    needs_gradients = True

    def saliency(self, value: Tensor, param: nn.Parameter | None) -> Tensor:
        _, g2 = self._stats(param)
        return 0.5 * value.detach().square() * g2


class RandomImportance(Criterion):
    """Uniform random channel scores (a baseline); reproducible with ``seed``.

    Example:
        >>> RandomImportance(seed=0).name
        'random'
    """

    name = "random"

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.seed = seed
        self._gen = torch.Generator().manual_seed(seed)

    def __repr__(self) -> str:
        return f"RandomImportance(seed={self.seed})"

    def saliency(self, value: Tensor, param: nn.Parameter | None) -> Tensor:
        return torch.rand(value.shape, generator=self._gen, dtype=torch.float64)

    def __call__(self, group: Any) -> Tensor:
        return torch.rand(len(group[0].idxs), generator=self._gen, dtype=torch.float64)


CRITERIA: dict[str, Any] = {
    "l1": lambda: Magnitude(1),
    "l2": lambda: Magnitude(2),
    "taylor": Taylor,
    "fisher": Fisher,
    "random": RandomImportance,
}


def get_criterion(criterion: str | Criterion) -> Criterion:
    """A criterion by name (``l1``, ``l2``, ``taylor``, ``fisher``, ``random``) or as given.

    Example:
        >>> get_criterion("l2")
        Magnitude(p=2)
    """
    if isinstance(criterion, Criterion):
        return criterion
    if criterion not in CRITERIA:
        raise ValueError(f"unknown criterion {criterion!r}; choose from {sorted(CRITERIA)}")
    return CRITERIA[criterion]()
