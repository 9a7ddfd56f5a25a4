"""Point-wise torch modules inside continual containers: batch norm and dropout rules."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import costream as cs


def _net(bn: nn.Module) -> cs.Sequential:
    return cs.continual(nn.Sequential(nn.Conv1d(3, 4, 3, padding=1), bn, nn.ReLU()))


@pytest.mark.parametrize("affine", [True, False])
def test_eval_batch_norm_steps_like_torch(affine: bool) -> None:
    torch.manual_seed(0)
    bn = nn.BatchNorm1d(4, affine=affine).double()
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    net = _net(bn).double().eval()
    x = torch.randn(2, 3, 9, dtype=torch.float64)
    with torch.inference_mode():
        assert torch.allclose(net.forward_steps(x, pad_end=True), net(x), atol=1e-12)


def test_batch_norm_in_training_mode_refuses_to_step() -> None:
    net = _net(nn.BatchNorm1d(4)).train()
    with pytest.raises(RuntimeError, match=r"call \.eval\(\)"):
        net.forward_steps(torch.randn(1, 3, 4))


def test_batch_norm_without_running_statistics_refuses_to_step() -> None:
    net = _net(nn.BatchNorm1d(4, track_running_stats=False)).eval()
    with pytest.raises(RuntimeError, match="running statistics"):
        net.forward_steps(torch.randn(1, 3, 4))


def test_dropout_in_training_mode_refuses_to_step() -> None:
    net = cs.continual(nn.Sequential(nn.Conv1d(3, 4, 3), nn.Dropout(0.5))).train()
    with pytest.raises(RuntimeError, match="dropout in training mode"):
        net.forward_steps(torch.randn(1, 3, 4))

