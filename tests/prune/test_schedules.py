"""Schedules: one-shot, iterative linear and Zhu & Gupta's cubic, against values by hand."""

from __future__ import annotations

import itertools

import pytest

from costream.prune import Schedule, cubic_sparsity


def test_cubic_formula_by_hand() -> None:
    # s_t = s_f + (s_i - s_f) (1 - (t - t0) / (n dt))^3 with s_i = 0.1, s_f = 0.9, t0 = 10,
    # n = 4, dt = 5: at t = 20 the progress is 10 / 20 = 0.5 -> 0.9 - 0.8 * 0.125 = 0.8
    assert cubic_sparsity(20, final=0.9, initial=0.1, t0=10, n=4, dt=5) == pytest.approx(0.8)
    # progress 0.25 -> 0.9 - 0.8 * 0.421875 = 0.5625
    assert cubic_sparsity(15, final=0.9, initial=0.1, t0=10, n=4, dt=5) == pytest.approx(0.5625)
    assert cubic_sparsity(5, final=0.9, initial=0.1, t0=10, n=4, dt=5) == pytest.approx(0.1)
    assert cubic_sparsity(40, final=0.9, initial=0.1, t0=10, n=4, dt=5) == pytest.approx(0.9)


def test_cubic_schedule_densities_by_hand() -> None:
    # s_f = 0.5, s_i = 0, n = 4: s_k = 0.5 - 0.5 (1 - k/4)^3
    #   k=1: 0.5 - 0.5 * 27/64 = 0.2890625, k=2: 0.4375, k=3: 0.4921875, k=4: 0.5
    assert Schedule("cubic", steps=4).densities(0.5) == [0.7109375, 0.5625, 0.5078125, 0.5]
    # s_f = 0.9 from density 0.8 (s_i = 0.2), n = 2: k=1: 0.9 - 0.7 / 8 = 0.8125
    got = Schedule("cubic", steps=2, initial_density=0.8).densities(0.1)
    assert got == pytest.approx([0.1875, 0.1])


def test_linear_and_one_shot() -> None:
    assert Schedule("linear", steps=4).densities(0.2) == pytest.approx([0.8, 0.6, 0.4, 0.2])
    assert Schedule().densities(0.3) == [0.3]
    assert Schedule("cubic", steps=1).densities(0.3) == pytest.approx([0.3])


def test_cubic_prunes_faster_early_than_linear() -> None:
    cubic = Schedule("cubic", steps=5).densities(0.1)
    linear = Schedule("linear", steps=5).densities(0.1)
    assert cubic[0] < linear[0] and cubic[-1] == pytest.approx(linear[-1])
    assert all(a > b for a, b in itertools.pairwise(cubic))


@pytest.mark.parametrize("kwargs, message", [
    ({"kind": "exponential"}, "kind"),
    ({"kind": "linear", "steps": 0}, "steps"),
    ({"kind": "one-shot", "steps": 3}, "exactly 1 step"),
    ({"initial_density": 0.0}, "initial_density"),
])
def test_validation(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Schedule(**kwargs)


def test_density_out_of_range() -> None:
    with pytest.raises(ValueError, match="final density"):
        Schedule().densities(0.0)
    with pytest.raises(ValueError, match="final density"):
        Schedule("linear", steps=2, initial_density=0.5).densities(0.7)
    with pytest.raises(ValueError, match="n >= 1"):
        cubic_sparsity(1, 0.5, n=0)


def test_json_round_trip() -> None:
    schedule = Schedule("linear", steps=7, initial_density=0.9)
    assert Schedule.from_json(schedule.to_json()) == schedule
    with pytest.raises(ValueError, match="unknown schedule fields"):
        Schedule.from_json('{"kind": "cubic", "rate": 2}')
