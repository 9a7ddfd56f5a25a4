"""Kernels derived from parameters follow every way the parameters can change."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import costream as cs
from costream.modules._cache import DerivedCache


def _stream(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    conv.reset_state()
    with torch.inference_mode():
        return conv.forward_steps(x, pad_end=True)


@pytest.mark.parametrize("make", [
    lambda: cs.Conv1d(3, 4, 3, padding=1),            # the lean addmm step
    lambda: cs.Conv1d(3, 4, 3, padding=1, groups=1, dilation=2),
    lambda: cs.Conv3d(3, 4, (3, 1, 1), padding=(1, 0, 0)),
])
@pytest.mark.parametrize("change", ["in_place", "replace", "load_state_dict", "bias_in_place"])
def test_stepping_sees_changed_parameters(make, change: str) -> None:
    torch.manual_seed(0)
    conv = make().double()
    shape = (2, 3, 9) + (5, 5) * (conv.weight.dim() == 5)
    x = torch.randn(shape, dtype=torch.float64)
    first = _stream(conv, x)
    assert torch.allclose(first, conv(x), atol=1e-10)
    new_w = torch.randn_like(conv.weight)
    with torch.no_grad():
        if change == "in_place":
            conv.weight.copy_(new_w)
        elif change == "replace":
            conv.weight = nn.Parameter(new_w)
        elif change == "load_state_dict":
            conv.load_state_dict({"weight": new_w, "bias": torch.randn_like(conv.bias)})
        else:
            conv.bias.add_(1.0)
    second = _stream(conv, x)
    assert not torch.allclose(second, first)
    assert torch.allclose(second, conv(x), atol=1e-10)


def test_a_copy_made_under_inference_mode_steps_with_a_warning() -> None:
    """Deep-copying a stepped module inside inference mode makes inference parameters (no
    version counter) that its copied caches still refer to: stepping warns, and is exact."""
    conv = cs.Conv1d(3, 4, 3).double()
    x = torch.randn(2, 3, dtype=torch.float64)
    with torch.inference_mode():
        conv.forward_step(x)
        copy_ = copy.deepcopy(conv)
        copy_.reset_state()
        with pytest.warns(UserWarning, match="inference"):
            ys = [copy_.forward_step(x) for _ in range(3)]
    clip = x.unsqueeze(2).expand(-1, -1, 3)
    torch.testing.assert_close(ys[-1], conv(clip)[:, :, 0])


def test_a_changed_float_source_derives_again() -> None:
    """Non-tensor sources (a batch norm's ``eps``) count as changed when their value does."""
    calls = []
    w = torch.ones(3)

    def derive():
        calls.append(1)
        return (w * 2,)

    cache = DerivedCache(derive)
    with torch.no_grad():
        cache.get(w, 1e-5)
        cache.get(w, 1e-5)
        assert len(calls) == 1
        cache.get(w, 0.5)
        assert len(calls) == 2
        cache.get(w, None)
        cache.get(w, None)
        assert len(calls) == 3


def test_scratch_tensors_are_kept_per_shape_and_thread_and_not_copied() -> None:
    import pickle
    import threading

    from costream.modules._cache import Scratch
    scratch = Scratch()
    args = ((2, 3), torch.float32, torch.device("cpu"), torch.contiguous_format)
    a = scratch.get(*args)
    assert scratch.get(*args) is a  # the same tensor next step
    assert scratch.get((2, 4), *args[1:]) is not a
    other = []
    worker = threading.Thread(target=lambda: other.append(scratch.get(*args)))
    worker.start()
    worker.join()
    assert other[0] is not a  # another thread stepping the same module writes elsewhere
    for twin in (copy.deepcopy(scratch), pickle.loads(pickle.dumps(scratch))):
        assert twin.tensors == {}
