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


def test_scratch_is_one_buffer_per_thread_shared_by_every_shape_and_not_copied() -> None:
    import pickle
    import threading

    from costream.modules._cache import Scratch
    scratch = Scratch()
    cpu = torch.device("cpu")
    c = scratch.get((1, 2, 2, 2, 3), torch.float32, cpu, torch.channels_last_3d)
    assert c.shape == (1, 2, 2, 2, 3) and c.is_contiguous(memory_format=torch.channels_last_3d)
    # the next requests (other layers' shapes) write the same memory, still in the caches
    b = scratch.get((1, 4, 2, 3), torch.float32, cpu, torch.channels_last)
    assert b.shape == (1, 4, 2, 3) and b.is_contiguous(memory_format=torch.channels_last)
    a = scratch.get((2, 3), torch.float32, cpu, torch.contiguous_format)
    assert a.shape == (2, 3) and a.is_contiguous()
    assert a.data_ptr() == b.data_ptr() == c.data_ptr()
    d = scratch.get((5, 5), torch.float32, cpu, torch.contiguous_format)  # grows the buffer
    assert d.shape == (5, 5) and scratch.get((2, 3), torch.float32, cpu,
                                             torch.contiguous_format).data_ptr() == d.data_ptr()
    assert scratch.get((2, 3), torch.float64, cpu, torch.contiguous_format).dtype == torch.float64
    other = []
    worker = threading.Thread(
        target=lambda: other.append(scratch.get((2, 3), torch.float32, cpu,
                                                torch.contiguous_format)))
    worker.start()
    worker.join()
    assert other[0].data_ptr() != a.data_ptr()  # another thread stepping writes elsewhere
    for twin in (copy.deepcopy(scratch), pickle.loads(pickle.dumps(scratch))):
        assert twin.buffers == {} and twin.views == {}
