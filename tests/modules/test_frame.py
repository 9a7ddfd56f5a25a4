"""Frame maps (Linear over channels): input checks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import costream as cs


def test_linear_clip_with_wrong_channels_is_a_clear_error() -> None:
    net = cs.Sequential(cs.Linear(8, 4), nn.ReLU())
    with pytest.raises(ValueError, match=r"Linear expects clips \(B, 8, T"):
        net(torch.randn(1, 5, 10))
