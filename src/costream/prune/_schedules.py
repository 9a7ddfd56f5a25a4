"""Pruning schedules: how the kept fraction of channels moves from the start to the target.

A schedule turns a final density (fraction of channels kept) into the density to reach after
each pruning step. Three kinds exist:

* ``"one-shot"``: a single step straight to the target;
* ``"linear"``: ``steps`` equal decrements of density (iterative linear pruning);
* ``"cubic"``: the gradual schedule of Zhu & Gupta, "To prune, or not to prune" (2017):
  sparsity ``s_t = s_f + (s_i - s_f) (1 - (t - t0) / (n dt))^3``, which prunes fast while many
  redundant channels remain and slowly near the target.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any, Literal

ScheduleKind = Literal["one-shot", "linear", "cubic"]
_KINDS = ("one-shot", "linear", "cubic")


def cubic_sparsity(t: float, final: float, initial: float = 0.0, t0: float = 0.0,
                   n: int = 1, dt: float = 1.0) -> float:
    """Zhu & Gupta's sparsity at time ``t``: ``s_f + (s_i - s_f) (1 - (t - t0) / (n dt))^3``.

    Before ``t0`` the sparsity is ``initial``; after ``t0 + n dt`` it is ``final``.

    Args:
        t: the current step (training iteration or pruning step).
        final: target sparsity ``s_f`` in ``[0, 1]``.
        initial: starting sparsity ``s_i``.
        t0: the step pruning starts at.
        n: number of pruning steps.
        dt: steps between two pruning steps.

    Example:
        >>> cubic_sparsity(2, final=0.5, n=4)  # half-way: 0.5 - 0.5 * 0.5 ** 3
        0.4375
    """
    if n < 1 or dt <= 0:
        raise ValueError(f"cubic schedule needs n >= 1 and dt > 0, got n={n}, dt={dt}")
    progress = min(max((t - t0) / (n * dt), 0.0), 1.0)
    return final + (initial - final) * (1.0 - progress) ** 3


@dataclass(frozen=True)
class Schedule:
    """How many pruning steps to take and the channel density to reach after each.

    Args:
        kind: ``"one-shot"``, ``"linear"`` or ``"cubic"``.
        steps: number of pruning steps (``1`` for one-shot).
        initial_density: density before the first step (``1.0``: the unpruned network).

    Example:
        >>> Schedule("cubic", steps=4).densities(0.5)
        [0.7109375, 0.5625, 0.5078125, 0.5]
        >>> Schedule("linear", steps=2).densities(0.5)
        [0.75, 0.5]
        >>> Schedule.from_json(Schedule("cubic", steps=3).to_json())
        Schedule(kind='cubic', steps=3, initial_density=1.0)
    """

    kind: ScheduleKind = "one-shot"
    steps: int = 1
    initial_density: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"schedule kind must be one of {_KINDS}, got {self.kind!r}")
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"schedule steps must be a positive int, got {self.steps!r}")
        if self.kind == "one-shot" and self.steps != 1:
            raise ValueError("a one-shot schedule has exactly 1 step; use 'linear' or 'cubic'")
        if not 0.0 < self.initial_density <= 1.0:
            raise ValueError(f"initial_density must be in (0, 1], got {self.initial_density}")

    def densities(self, final: float) -> list[float]:
        """The channel density to reach after each step, ending at ``final``."""
        if not 0.0 < final <= self.initial_density:
            raise ValueError(f"final density must be in (0, {self.initial_density}], got {final}")
        s_i, s_f, n = 1.0 - self.initial_density, 1.0 - final, self.steps
        if self.kind == "one-shot":
            return [final]
        if self.kind == "linear":
            return [1.0 - (s_i + (s_f - s_i) * k / n) for k in range(1, n + 1)]
        return [1.0 - cubic_sparsity(k, s_f, s_i, n=n) for k in range(1, n + 1)]

    def to_json(self) -> str:
        """The schedule as a JSON object."""
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str | dict[str, Any]) -> Schedule:
        """A schedule from :meth:`to_json` output (or the decoded dict)."""
        data = json.loads(text) if isinstance(text, str) else dict(text)
        unknown = set(data) - {"kind", "steps", "initial_density"}
        if unknown:
            raise ValueError(f"unknown schedule fields {sorted(unknown)}")
        return cls(**data)
