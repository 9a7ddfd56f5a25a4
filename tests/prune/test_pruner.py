"""Pruning: continual networks keep streaming exactly; ResNet-18 shrinks and gets faster."""

from __future__ import annotations

import copy
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

import costream as cs
from costream.core._tree import tree_leaves
from costream.prune import (
    Pruner,
    Schedule,
    apply_masks,
    count_macs,
    kept_masks,
    layer_macs,
    prune,
    step_macs,
)
from costream.prune.adapters import SPLoRAConfig, SPPaRAConfig, add_adapters, merge_adapters
from costream.testing import assert_streaming_equivalent


def _randomise_norms(net: nn.Module) -> nn.Module:
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return net.eval()


def conv_stack() -> cs.Sequential:
    """A small continual 3D CNN in the X3D style: stem, residual block, depthwise temporal conv."""
    return _randomise_norms(cs.Sequential(
        cs.Conv3d(3, 16, 3, padding=1), nn.BatchNorm3d(16), nn.ReLU(),
        cs.Residual(cs.Sequential(
            cs.Conv3d(16, 24, 3, padding=1), nn.BatchNorm3d(24), nn.ReLU(),
            cs.Conv3d(24, 16, 1), nn.BatchNorm3d(16))),
        nn.ReLU(),
        cs.Conv3d(16, 16, (3, 1, 1), padding=(1, 0, 0), groups=16), nn.BatchNorm3d(16), nn.ReLU(),
        cs.Conv3d(16, 8, 3, padding=(0, 1, 1)),
    )).double()


def _state_numel(net: cs.CoModule, frame_shape: tuple[int, ...]) -> int:
    tree = net.init_state(1, frame_shape, dtype=torch.float64)["tree"]
    return sum(t.numel() for _, t in tree_leaves(tree))


def _measured_step_macs(net: cs.CoModule, x: Tensor) -> int:
    net.reset_state()
    with torch.no_grad():
        net.forward_steps(x[:1, :, :-1])  # warm-up: past the delay of every layer
        with FlopCounterMode(display=False) as counter:
            y = net.forward_step(x[:1, :, -1])
    net.reset_state()
    assert y is not None
    return counter.get_total_flops() // 2


@pytest.mark.parametrize("adapter", [None, "splora", "sppara"])
def test_pruned_continual_stack_streams_exactly_with_smaller_state(adapter: str | None) -> None:
    net = conv_stack()
    x = torch.randn(2, 3, 8, 5, 5, dtype=torch.float64)
    reference = copy.deepcopy(net)
    if adapter is not None:
        config = (SPLoRAConfig(rank=3, init_scale=0.1) if adapter == "splora"
                  else SPPaRAConfig(init_scale=0.1))
        add_adapters(net, config)
    prune(net, x[:1], "l1", density=0.5)
    if adapter is not None:
        with torch.no_grad():
            adapted = net(x)
        merge_adapters(net)
        torch.testing.assert_close(net(x), adapted, rtol=1e-12, atol=1e-12)
    assert net[0].out_channels == 8 and net.get_submodule("3.0.0").out_channels == 12
    assert net[8].out_channels == 8  # the output width is never pruned
    assert_streaming_equivalent(net, x, self_consistency_only=True)  # pruned: no source
    frame = (3, 5, 5)
    assert _state_numel(net, frame) < _state_numel(reference, frame)


def test_step_macs_drop_as_accounted() -> None:
    net = conv_stack()
    x = torch.randn(1, 3, 8, 6, 6, dtype=torch.float64)
    before_measured, before_accounted = _measured_step_macs(net, x), step_macs(net, x)
    prune(net, x, "l2", density=0.5)
    after_measured, after_accounted = _measured_step_macs(net, x), step_macs(net, x)
    assert before_measured == before_accounted
    assert after_measured == after_accounted
    assert after_measured < 0.5 * before_measured


def test_masks_replay_on_a_fresh_base() -> None:
    base = conv_stack()
    net = copy.deepcopy(base)
    x = torch.randn(2, 3, 6, 6, 6, dtype=torch.float64)
    prune(net, x[:1], "l1", density=0.4, schedule="cubic", steps=3)
    rebuilt = apply_masks(copy.deepcopy(base), kept_masks(net))
    torch.testing.assert_close(rebuilt(x), net(x), rtol=0, atol=0)
    assert_streaming_equivalent(rebuilt, x, net)


def test_schedule_steps_reach_their_densities() -> None:
    net = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                        nn.Linear(64, 2))
    pruner = Pruner(net, torch.randn(1, 8), "l1", density=0.25, schedule="cubic", steps=3)
    targets = Schedule("cubic", steps=3).densities(0.25)
    reports = pruner.run()
    assert [r.target_density for r in reports] == targets
    for r, t in zip(reports, targets, strict=True):
        assert r.initial_channels == 128
        assert r.density == pytest.approx(t, abs=1 / 64)
    assert pruner.finished and net[0].out_features == 16


def test_layer_density_and_global_ranking() -> None:
    net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                        nn.Linear(32, 2))
    with torch.no_grad():
        net[2].weight.mul_(100.0)  # the second layer's channels are far more important
    Pruner(net, torch.randn(1, 8), "l1", density=0.5, global_pruning=True,
           layer_density={"0": 0.75}).run()
    assert net[0].out_features == 24
    assert net[2].out_features == 16
    net2 = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                         nn.Linear(32, 2))
    with torch.no_grad():
        net2[0].weight[:16].mul_(1e-3)
    report = Pruner(net2, torch.randn(1, 8), "l1", density=0.5, global_pruning=True,
                    round_to=4).step()
    assert report.channels == 32
    assert net2[0].out_features % 4 == 0 and net2[2].out_features % 4 == 0


class _AttentionMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(6, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.up = nn.Linear(8, 32)
        self.down = nn.Linear(32, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.embed(x)
        h = h + self.attn(h, h, h, need_weights=False)[0]
        return self.down(F.relu(self.up(h)))


@pytest.mark.parametrize("adapted", [False, True])
def test_attention_width_is_kept_and_mlp_neurons_pruned(adapted: bool) -> None:
    net = _AttentionMLP().double()
    x = torch.randn(2, 5, 6, dtype=torch.float64)
    if adapted:
        add_adapters(net, SPLoRAConfig(rank=2, init_scale=0.1))
    prune(net, x[:1], "l1", density=0.5)
    attn = net.attn.base_layer if adapted else net.attn
    up = net.up.base_layer if adapted else net.up
    assert attn.embed_dim == 8 and up.weight.shape == (16, 8)
    with torch.no_grad():
        y = net(x)
    if adapted:
        torch.testing.assert_close(merge_adapters(net)(x), y, rtol=1e-12, atol=1e-12)
    assert y.shape == (2, 5, 3)


def test_import_costream_does_not_import_pruning_dependencies() -> None:
    code = ("import sys, costream; "
            "bad = [m for m in ('torch_pruning', 'safetensors', 'costream.prune') "
            "if m in sys.modules]; sys.exit(1 if bad else 0)")
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


# ---------------------------------------------------------------- ResNet-18


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 layout (He et al. 2016): 7x7 stem, 4 stages of 2 basic blocks, 64-512 wide."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64),
                                  nn.ReLU(), nn.MaxPool2d(3, 2, 1))
        blocks, cin = [], 64
        for i, cout in enumerate((64, 128, 256, 512)):
            blocks += [BasicBlock(cin, cout, 1 if i == 0 else 2), BasicBlock(cout, cout, 1)]
            cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(512, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.blocks(self.stem(x)).mean((2, 3)))


def _best_latencies(a: nn.Module, b: nn.Module, x: Tensor, repeats: int = 15) -> tuple:
    """Fastest of interleaved runs on one thread: other load on the machine only slows runs
    down, so the minimum is the estimate least disturbed by it."""
    times: dict[int, list[float]] = {0: [], 1: []}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            for m in (a, b):
                m(x)
            for _ in range(repeats):
                for i, m in enumerate((a, b)):
                    t0 = time.perf_counter()
                    m(x)
                    times[i].append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)
    return min(times[0]), min(times[1])


@pytest.mark.parametrize("criterion", ["l1", "l2", "taylor", "fisher", "random"])
def test_resnet18_global_half_channels(criterion: str) -> None:
    base = _randomise_norms(ResNet18())
    net = copy.deepcopy(base)
    x = torch.randn(1, 3, 32, 32)
    batches = [(torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,))) for _ in range(2)]
    pruner = Pruner(net, x, criterion, density=0.5, global_pruning=True)
    pruner.calibrate(batches, F.cross_entropy)
    report = pruner.step()
    net.eval()
    assert report.density <= 0.5 + 1e-9 and report.channels > 0
    assert net(x).shape == (1, 10)
    n_base = sum(p.numel() for p in base.parameters())
    n_net = sum(p.numel() for p in net.parameters())
    assert n_net < 0.5 * n_base
    assert count_macs(net, x) == layer_macs(net, x) < 0.5 * count_macs(base, x)
    slow, fast = _best_latencies(base, net, x)
    assert fast < slow
