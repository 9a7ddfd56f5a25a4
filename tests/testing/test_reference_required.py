"""assert_streaming_equivalent compares with the source, or says explicitly that it does not."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import costream as cs
from costream.testing import assert_streaming_equivalent


@pytest.fixture
def misaligned() -> tuple[nn.Module, cs.CoModule, torch.Tensor]:
    """A residual block and a conversion that crops its shortcut at the wrong end."""
    torch.manual_seed(0)
    conv = nn.Conv1d(3, 3, 3).double()

    class Block(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return conv(x) + x[:, :, 1:-1]  # shortcut centred on the conv's window

    co = cs.Residual(cs.continual(conv), align="end")  # wrong: the shortcut's last frames
    return Block(), co, torch.randn(2, 3, 10, dtype=torch.float64)


def test_a_misaligned_branch_is_caught_with_the_reference(misaligned) -> None:
    src, co, x = misaligned
    with pytest.raises(AssertionError, match="forward vs reference"):
        assert_streaming_equivalent(co, x, src)


def test_omitting_the_reference_raises(misaligned) -> None:
    _, co, x = misaligned
    with pytest.raises(TypeError, match="needs the offline reference"):
        assert_streaming_equivalent(co, x)
    with pytest.raises(TypeError, match="needs the offline reference"):
        assert_streaming_equivalent(co, x, None, check_batch=False)


def test_self_consistency_only_is_explicit(misaligned) -> None:
    src, co, x = misaligned
    # the misaligned module is consistent with itself: this is all that is checked without
    # a reference, which is why it must be asked for by name
    assert_streaming_equivalent(co, x, self_consistency_only=True)
    with pytest.raises(TypeError, match="drop one of them"):
        assert_streaming_equivalent(co, x, src, self_consistency_only=True)
