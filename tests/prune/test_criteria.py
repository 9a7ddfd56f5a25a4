"""Importance criteria over Torch-Pruning groups, checked against scores computed by hand."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from costream.prune import (
    CRITERIA,
    Fisher,
    Magnitude,
    Pruner,
    RandomImportance,
    Taylor,
    get_criterion,
)
from costream.prune.adapters import SPLoRAConfig, add_adapters


def _net() -> nn.Sequential:
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0] * 3, [2.0] * 3, [0.0] * 3, [-3.0] * 3]))
        net[2].weight.copy_(torch.tensor([[1.0, -1.0, 4.0, 2.0], [1.0, 1.0, -4.0, 2.0]]))
    return net


def _group(net: nn.Module, x: Tensor, layer: nn.Module, n: int):
    dg = Pruner(net, x).graph  # Torch-Pruning's graph, built with costream's layer handlers
    return dg.get_pruning_group(layer, dg.get_pruner_of_module(layer).prune_out_channels,
                                list(range(n)))


def test_l1_by_hand() -> None:
    net = _net()
    group = _group(net, torch.randn(1, 3), net[0], 4)
    # rows of fc1: mean |w| = [1, 2, 0, 3], mean 1.5 -> [2/3, 4/3, 0, 2]
    # columns of fc2: mean |w| = [1, 1, 4, 2], mean 2 -> [1/2, 1/2, 2, 1]
    expected = torch.tensor([(2 / 3 + 0.5) / 2, (4 / 3 + 0.5) / 2, 1.0, 1.5], dtype=torch.float64)
    torch.testing.assert_close(Magnitude(1)(group), expected)


def test_l2_by_hand() -> None:
    net = _net()
    group = _group(net, torch.randn(1, 3), net[0], 4)
    a = torch.tensor([1.0, 4.0, 0.0, 9.0], dtype=torch.float64) / 3.5
    b = torch.tensor([1.0, 1.0, 16.0, 4.0], dtype=torch.float64) / 5.5
    torch.testing.assert_close(Magnitude(2)(group), (a + b) / 2)


def test_taylor_uses_accumulated_gradients() -> None:
    net = _net()
    group = _group(net, torch.randn(1, 3), net[0], 4)
    crit = Taylor()
    with pytest.raises(ValueError, match="needs gradient statistics"):
        crit(group)
    for g in (0.25, 0.75):  # two batches: summed gradient rows [1, 0, 1, 1]
        net[0].weight.grad = torch.tensor([[g] * 3, [0.0] * 3, [g] * 3, [g] * 3])
        net[2].weight.grad = torch.zeros(2, 4)
        crit.observe(net)
    # fc1 rows |w g| = [1, 0, 0, 3] (mean 1); fc2 has zero saliency -> neutral ones
    torch.testing.assert_close(crit(group), torch.tensor([1.0, 0.5, 0.5, 2.0],
                                                         dtype=torch.float64))
    crit.reset()
    assert crit.batches == 0


def test_fisher_squares_gradients_per_batch() -> None:
    lin = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[2.0, 3.0]]))
    crit = Fisher()
    for g in ([1.0, -1.0], [2.0, 1.0]):
        lin.weight.grad = torch.tensor([g])
        crit.observe(lin)
    # 0.5 w^2 (g1^2 + g2^2) = 0.5 * [4 * 5, 9 * 2]
    torch.testing.assert_close(crit.saliency(lin.weight, lin.weight), torch.tensor([[10.0, 9.0]]))


def test_random_is_reproducible() -> None:
    net = _net()
    group = _group(net, torch.randn(1, 3), net[0], 4)
    a, b = RandomImportance(seed=3)(group), RandomImportance(seed=3)(group)
    assert torch.equal(a, b) and a.shape == (4,)
    assert not torch.equal(a, RandomImportance(seed=4)(group))


class _Concat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv1d(2, 3, 1)
        self.b = nn.Conv1d(2, 5, 1)
        self.c = nn.Conv1d(8, 2, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.c(torch.cat([self.a(x), self.b(x)], 1))


def test_concat_groups_map_channels_to_the_root() -> None:
    net = _Concat()
    with torch.no_grad():
        net.a.weight.copy_(torch.tensor([1.0, 2.0, 3.0]).view(3, 1, 1).expand(3, 2, 1))
        net.c.weight.fill_(1.0)
    group = _group(net, torch.randn(1, 2, 4), net.b, 5)
    assert Magnitude(1)(group).shape == (5,)
    group = _group(net, torch.randn(1, 2, 4), net.a, 3)
    scores = Magnitude(1)(group)
    # a's rows [1, 2, 3] / 2 and c's (equal) columns 0..2 / 1
    torch.testing.assert_close(scores, torch.tensor([0.75, 1.0, 1.25], dtype=torch.float64))


def test_adapter_layers_are_scored_on_adapted_weights() -> None:
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    with torch.no_grad():
        net[0].weight.fill_(1.0)
    add_adapters(net, SPLoRAConfig(rank=1, target_modules=["0"]))
    layer = net[0]
    with torch.no_grad():
        layer.lora_A["weight"].fill_(1.0)
        layer.lora_B["weight"].copy_(torch.tensor([[0.0], [0.0], [9.0], [0.0]]))
    group = _group(net, torch.randn(1, 3), layer, 4)
    scores = Magnitude(1)(group)
    assert int(scores.argmax()) == 2


def test_registry() -> None:
    assert sorted(CRITERIA) == ["fisher", "l1", "l2", "random", "taylor"]
    assert isinstance(get_criterion("taylor"), Taylor)
    crit = Magnitude(2)
    assert get_criterion(crit) is crit
    with pytest.raises(ValueError, match="unknown criterion"):
        get_criterion("hessian")
    with pytest.raises(ValueError, match="p=1 or p=2"):
        Magnitude(3)
