"""Channel pruning over Torch-Pruning's dependency graph.

:class:`Pruner` builds a ``torch_pruning.DependencyGraph`` of the network (continual modules and
adapter layers included), scores every group of coupled channels with a criterion, picks the
channels to drop (per layer, or globally over all groups) at the density the schedule asks for,
and has Torch-Pruning remove them physically. After each step it records the kept channels
(:func:`costream.prune.kept_masks`), invalidates the cached kernels and stream state of continual
modules, and restores which parameters were frozen.

Groups whose channels reach a network output are never pruned (the output width is part of the
network's contract), nor groups touching a layer that cannot lose channels here: SPLoPA (it
prunes blocks instead) and multi-head attention (embedding dimensions would have to be removed
head-consistently; attention layers keep their width).

DepGraph: Fang et al., "DepGraph: Towards Any Structural Pruning", CVPR 2023.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch_pruning as tp
from torch import Tensor, nn

from ._criteria import Criterion, get_criterion, pruning_kind
from ._masks import record_removal, refresh
from ._schedules import Schedule
from ._tracing import traceable


@dataclass(frozen=True)
class StepReport:
    """What one pruning step did: target and reached channel density over the pruned groups.

    Example:
        >>> from costream.prune import StepReport
        >>> StepReport(step=1, target_density=0.5, channels=48, initial_channels=96).density
        0.5
    """

    step: int
    target_density: float
    channels: int
    initial_channels: int

    @property
    def density(self) -> float:
        """Fraction of the prunable channels still present."""
        return self.channels / self.initial_channels if self.initial_channels else 1.0


def _root_types() -> tuple[type, ...]:
    from .adapters._layer import AdapterLayer

    return (nn.modules.conv._ConvNd, nn.Linear, AdapterLayer)


class Pruner:
    """Prune the channels of ``model`` in place, step by step, to a target density.

    Args:
        model: the network (``torch.nn``, costream continual, with or without adapters).
        example_inputs: an input (or tuple of inputs) for one offline forward pass.
        criterion: ``"l1"``, ``"l2"``, ``"taylor"``, ``"fisher"``, ``"random"`` or a
            :class:`~costream.prune.Criterion`.
        density: fraction of channels to keep at the end (per group, or overall if global).
        schedule: a :class:`Schedule` or its kind (``"one-shot"``, ``"linear"``, ``"cubic"``).
        steps: number of steps when ``schedule`` is given by kind.
        global_pruning: rank channels of all groups together (one threshold) instead of
            pruning every group to the same density.
        layer_density: per-layer final densities (module name or module -> density); a group
            whose channels a listed layer produces is pruned locally to that density.
        ignored_layers: layers whose output channels are never pruned.
        round_to: keep a multiple of this many channels per group.
        min_channels: keep at least this many channels per group.

    Gradient criteria need :meth:`calibrate` before each :meth:`step`. Parameters are replaced
    by pruning: rebuild optimizers after a step.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(),
        ...                     nn.Conv2d(16, 4, 3))
        >>> pruner = Pruner(net, torch.randn(1, 3, 8, 8), "l1", density=0.25)
        >>> pruner.step().channels, net[0].out_channels, net[1].num_features
        (4, 4, 4)
        >>> net(torch.randn(1, 3, 8, 8)).shape  # the output width is kept
        torch.Size([1, 4, 4, 4])
    """

    def __init__(
        self,
        model: nn.Module,
        example_inputs: Any,
        criterion: str | Criterion = "l1",
        density: float = 0.5,
        *,
        schedule: Schedule | str = "one-shot",
        steps: int = 1,
        global_pruning: bool = False,
        layer_density: Mapping[str | nn.Module, float] | None = None,
        ignored_layers: Sequence[nn.Module] = (),
        round_to: int = 1,
        min_channels: int = 1,
        forward_fn: Callable[[nn.Module, Any], Any] | None = None,
    ) -> None:
        if not 0.0 < density <= 1.0:
            raise ValueError(f"density must be in (0, 1], got {density}")
        if round_to < 1 or min_channels < 1:
            raise ValueError("round_to and min_channels must be >= 1")
        _refuse_computed_weights(model)
        self.model = model
        self.criterion = get_criterion(criterion)
        self.schedule = schedule if isinstance(schedule, Schedule) else Schedule(
            schedule, steps=steps)
        self.density = density
        self.global_pruning = global_pruning
        self.round_to = round_to
        self.min_channels = min_channels
        self.current_step = 0
        self._targets = self.schedule.densities(density)
        names = {name: m for name, m in model.named_modules()}
        self._layer_targets: dict[nn.Module, list[float]] = {}
        for key, d in (layer_density or {}).items():
            module = names.get(key) if isinstance(key, str) else key
            if module is None:
                raise ValueError(f"layer_density names {key!r}, which the model does not have")
            self._layer_targets[module] = self.schedule.densities(d)
        self._ignored = [m for layer in ignored_layers for m in layer.modules()]
        self._initial: dict[nn.Module, int] = {}
        from .adapters._layer import ADAPTER_PRUNERS

        with traceable(model):
            self.graph = tp.DependencyGraph().build_dependency(
                model, example_inputs, forward_fn=forward_fn,
                customized_pruners=dict(ADAPTER_PRUNERS), verbose=False)

    # ------------------------------------------------------------------ calibration
    def calibrate(self, batches: Iterable[tuple[Any, Any]],
                  loss_fn: Callable[[Any, Any], Tensor]) -> None:
        """Gather gradient statistics for the criterion: ``loss_fn(model(x), y).backward()``.

        Every parameter temporarily requires grad (so frozen base weights under adapters get
        gradients with respect to the weights the network uses); gradients are cleared after.
        """
        self.criterion.reset()
        if not self.criterion.needs_gradients:
            return
        flags = [(p, p.requires_grad) for p in self.model.parameters()]
        try:
            for p, _ in flags:
                p.requires_grad_(True)
            with torch.enable_grad():
                for x, y in batches:
                    self.model.zero_grad(set_to_none=True)
                    loss_fn(self.model(x), y).backward()
                    self.criterion.observe(self.model)
        finally:
            for p, flag in flags:
                p.requires_grad_(flag)
                p.grad = None

    # ------------------------------------------------------------------ pruning
    @property
    def finished(self) -> bool:
        """Whether every step of the schedule has run."""
        return self.current_step >= len(self._targets)

    def step(self) -> StepReport:
        """Prune to the next density of the schedule and return what was reached."""
        if self.finished:
            raise RuntimeError(f"all {len(self._targets)} pruning steps have run")
        k = self.current_step
        target = self._targets[k]
        flags = {name: p.requires_grad for name, p in self.model.named_parameters()}
        plans = [self._plan(g, k) for g in self._groups()]
        removals = self._select(plans, target)
        with torch.no_grad():
            for (group, _, _, _, _), idxs in zip(plans, removals):
                if idxs:
                    self._prune_group(group, idxs)
        for name, p in self.model.named_parameters():
            p.requires_grad_(flags.get(name, True))
        refresh(self.model)
        self.criterion.reset()
        self.current_step += 1
        now = sum(len(g[0].idxs) for g in self._groups())
        return StepReport(k + 1, target, now, sum(self._initial.values()))

    def run(self) -> list[StepReport]:
        """Run every remaining step without training in between."""
        return [self.step() for _ in range(len(self._targets) - self.current_step)]

    # ------------------------------------------------------------------ internals
    def _groups(self) -> list[Any]:
        dg = self.graph
        out = []
        for g in dg.get_all_groups(ignored_layers=self._ignored, root_module_types=_root_types()):
            ok = True
            for item in g:
                module = item.dep.target.module
                if getattr(module, "channel_prunable", True) is False or isinstance(
                        module, nn.MultiheadAttention):
                    ok = False
                elif dg.is_out_channel_pruning_fn(item.dep.handler) and not item.dep.target.outputs:
                    ok = False  # these channels are a network output
            if ok:
                out.append(g)
        return out

    def _plan(self, group: Any, step: int) -> tuple[Any, nn.Module, int, Tensor, float | None]:
        root = group[0].dep.target.module
        n = len(group[0].idxs)
        self._initial.setdefault(root, n)
        local = None
        for item in group:
            module = item.dep.target.module
            if module in self._layer_targets and self.graph.is_out_channel_pruning_fn(
                    item.dep.handler):
                local = self._layer_targets[module][step]
                break
        scores = self.criterion(group).to(torch.float64)
        if scores.shape != (n,):
            raise ValueError(f"criterion returned {tuple(scores.shape)} scores for a group of "
                             f"{n} channels")
        return group, root, n, scores, local

    def _keep(self, root: nn.Module, density: float) -> int:
        init = self._initial[root]
        keep = max(self.min_channels, math.ceil(init * density - 1e-9))
        keep = math.ceil(keep / self.round_to) * self.round_to
        return min(keep, init)

    def _select(self, plans: list, target: float) -> list[list[int]]:
        removals: list[list[int]] = [[] for _ in plans]
        pool: list[tuple[float, int, int]] = []
        floors = 0
        budget = 0
        for i, (_, root, n, scores, local) in enumerate(plans):
            if local is not None or not self.global_pruning:
                keep = self._keep(root, target if local is None else local)
                if n > keep:
                    removals[i] = torch.argsort(scores, stable=True)[: n - keep].tolist()
                continue
            floor = min(n, self._keep(root, 0.0))
            order = torch.argsort(scores, descending=True, stable=True).tolist()
            pool.extend((float(scores[c]), i, c) for c in order[floor:])
            floors += floor
            budget += self._initial[root]
        if pool:
            keep_total = max(floors, math.ceil(budget * target - 1e-9))
            excess = floors + len(pool) - keep_total
            pool.sort(key=lambda t: t[0])
            for _, i, c in pool[: max(excess, 0)]:
                removals[i].append(c)
            if self.round_to > 1:
                for i, (_, _, n, scores, _) in enumerate(plans):
                    kept = n - len(removals[i])
                    rounded = min(n, math.ceil(kept / self.round_to) * self.round_to)
                    if rounded > kept:
                        drop = set(removals[i])
                        back = sorted(drop, key=lambda c: -float(scores[c]))[: rounded - kept]
                        removals[i] = sorted(drop - set(back))
        return [sorted(r) for r in removals]

    def _prune_group(self, group: Any, idxs: list[int]) -> None:
        dg = self.graph
        root = group[0].dep.target.module
        handler = dg.get_pruner_of_module(root).prune_out_channels
        pg = dg.get_pruning_group(root, handler, idxs)
        layers = set(self.model.modules())
        seen = set()
        for item in pg:
            module = item.dep.target.module
            if module not in layers:
                continue  # Torch-Pruning's placeholders for functional ops
            kind = pruning_kind(item.dep.handler)
            if (module, kind) in seen:
                continue
            seen.add((module, kind))
            record_removal(module, kind, list(item.idxs))
        pg.prune()


def _refuse_computed_weights(model: nn.Module) -> None:
    """Weight-normed / parametrized layers compute ``weight``: channels cannot be cut from it."""
    from torch.nn.utils import parametrize

    from ..convert._leaves import _Computed, old_weight_norm

    for name, m in model.named_modules():
        if isinstance(m, _Computed) or parametrize.is_parametrized(m) or \
                old_weight_norm(m) is not None:
            raise ValueError(
                f"cannot prune '{name}' ({type(m).__name__}): its weight is computed (weight norm "
                f"or a parametrization); remove it first (torch.nn.utils.remove_weight_norm or "
                f"torch.nn.utils.parametrize.remove_parametrizations) and convert again")


def prune(
    model: nn.Module,
    example_inputs: Any,
    criterion: str | Criterion = "l1",
    density: float = 0.5,
    *,
    calibration: tuple[Iterable[tuple[Any, Any]], Callable[[Any, Any], Tensor]] | None = None,
    **options: Any,
) -> nn.Module:
    """Prune ``model`` in place to ``density`` without training in between; return it.

    Args:
        model: the network to prune.
        example_inputs: an input (or tuple of inputs) for one forward pass.
        criterion: criterion name or instance (see :class:`Pruner`).
        density: fraction of channels to keep.
        calibration: ``(batches, loss_fn)`` for gradient criteria (re-run before every step;
            ``batches`` must be re-iterable, e.g. a list).
        **options: further :class:`Pruner` arguments (``schedule``, ``steps``,
            ``global_pruning``, ``layer_density``, ``ignored_layers``, ``round_to``, ...).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 2))
        >>> _ = prune(net, torch.randn(1, 8), "l2", density=0.5)
        >>> net[0].out_features, net[2].in_features
        (16, 16)
    """
    pruner = Pruner(model, example_inputs, criterion, density, **options)
    while not pruner.finished:
        if calibration is not None:
            pruner.calibrate(*calibration)
        pruner.step()
    return model
