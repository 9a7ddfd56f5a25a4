"""Every registered zoo model meets the streaming contract (float64, tiny inputs).

Driven by :func:`costream.models.list_models`: a newly registered model is checked without
further code. Offline originals with clip-scope SE cannot be stepped; they must refuse with an
error that points to the streamable scope.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import costream as cs
from costream.models import create_model, fold_batch_norm, list_models
from costream.models._layers import DepthwiseConv3d, GemmConv3d, ReplicateConv3d, conv3d
from costream.testing import assert_streaming_equivalent
from models._inputs import one_per_architecture

SIZE = 16  # spatial size of the test clips (res5 maps are 1x1)


def small(name: str, **kwargs: Any) -> nn.Module:
    """``name`` with 7 classes, a 2-frame head window, in float64."""
    return create_model(name, num_classes=7, head_pool=2, crop_size=SIZE, **kwargs).double()


def stream_for(model: nn.Module, batch: int, extra: int = 3) -> torch.Tensor:
    t = model.delay + extra * model.temporal.stride
    return torch.randn(batch, 3, t, SIZE, SIZE, dtype=torch.float64)


#: one name per architecture at the test size (test id ``a=b``): twins such as coslow_r50 and
#: slow_r50 compute alike (test_onnx.py checks it), so they are stepped once
VIDEO = one_per_architecture(list_models(family="video"))


@pytest.mark.parametrize("name", list(VIDEO), ids=["=".join(v) for v in VIDEO.values()])
def test_registered_model_streams_exactly(name: str) -> None:
    model = small(name)
    assert not model.training, "create_model returns eval-mode models"
    if not model.streamable:
        x = stream_for(model, 1, extra=1)
        y = model(x)
        assert y.shape == (1, 7, x.shape[2] - 1)
        with pytest.raises(RuntimeError, match="se_scope='frame'"):
            model.forward_step(x[:, :, 0])
        return
    # a zoo model's forward is its definition (test_checkpoints.py compares it with
    # PyTorchVideo's models): stepping is compared with it
    assert_streaming_equivalent(model, stream_for(model, 2), self_consistency_only=True)


def test_continual_x3d_streams_in_float32() -> None:
    model = small("cox3d_xs").float()
    x = stream_for(model, 1).float()
    assert_streaming_equivalent(model, x, check_batch=False, check_state=False,
                                self_consistency_only=True)


@pytest.mark.parametrize("name", ["cox3d_xs", "coi3d_r50"])
def test_replicate_fill_streams_exactly(name: str) -> None:
    model = small(name, temporal_fill="replicate")
    assert_streaming_equivalent(model, stream_for(model, 1), check_batch=False,
                                check_state=False, self_consistency_only=True)


def test_offline_and_continual_x3d_share_one_architecture() -> None:
    offline, continual = create_model("x3d_s"), create_model("cox3d_s", head_pool=64)
    assert offline.se_scope == "clip" and continual.se_scope == "frame"
    assert {k: v.shape for k, v in offline.state_dict().items()} == {
        k: v.shape for k, v in continual.state_dict().items()}
    # the head pool sets the receptive field, not the cost: 57 conv frames + the window
    assert offline.receptive_field == 57 + 12 and continual.receptive_field == 57 + 63


def test_receptive_fields_match_the_published_networks() -> None:
    assert create_model("cox3d_l", head_pool=1).receptive_field == 115
    assert create_model("coslow_r50", head_pool=1).receptive_field == 19
    i3d = create_model("coi3d_r50", head_pool=1)
    assert i3d.temporal.stride == 2


def test_folded_batch_norm_streams_exactly() -> None:
    model = small("cox3d_xs")
    for m in model.modules():
        if isinstance(m, nn.BatchNorm3d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
    folded = fold_batch_norm(model)
    assert not any(isinstance(m, nn.BatchNorm3d) for m in folded.modules())
    assert_streaming_equivalent(folded, stream_for(model, 1), model, check_batch=False,
                                check_state=False)


def test_unknown_name_lists_close_matches() -> None:
    with pytest.raises(KeyError, match="cox3d_s"):
        create_model("cox3ds")


def test_bad_options_are_rejected() -> None:
    with pytest.raises(ValueError, match="temporal_fill"):
        create_model("cox3d_s", temporal_fill="reflect")
    with pytest.raises(ValueError, match="se_scope"):
        create_model("x3d_s", se_scope="video")
    with pytest.raises(ValueError, match="head_pool"):
        create_model("slow_r50", head_pool=-1)


# ------------------------------------------------------------------ the zoo's conv variants
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize(("cls", "kwargs", "size"), [
    (DepthwiseConv3d, {"kernel_size": 3, "padding": 1, "groups": 6}, 21),  # split taps
    # one call for all taps: batch 2 x 14 x 14 pixels, under _SMALL_MAP
    (DepthwiseConv3d, {"kernel_size": 3, "padding": 1, "groups": 6}, 14),
    (DepthwiseConv3d, {"kernel_size": 3, "stride": (1, 2, 2), "padding": 1, "groups": 6}, 13),
    (DepthwiseConv3d, {"kernel_size": (5, 3, 3), "padding": (2, 1, 1), "groups": 6}, 21),
    (DepthwiseConv3d, {"kernel_size": 3, "padding": (0, 1, 1), "groups": 6, "bias": False}, 21),
    (DepthwiseConv3d, {"kernel_size": 3, "stride": (1, 2, 2), "padding": 1, "groups": 6}, 9),
    (DepthwiseConv3d, {"kernel_size": (5, 1, 1), "padding": (2, 0, 0), "groups": 6}, 7),
    # partial sums per future output: dilated in time, and strided in time (stacked sums)
    (DepthwiseConv3d, {"kernel_size": 3, "padding": (2, 1, 1), "dilation": (2, 1, 1),
                       "groups": 6}, 21),
    (DepthwiseConv3d, {"kernel_size": 3, "stride": (2, 1, 1), "padding": 1, "groups": 6}, 21),
    # temporal filters over the last frames: dilated, strided in space, unpadded
    (DepthwiseConv3d, {"kernel_size": (3, 1, 1), "padding": (3, 0, 0), "dilation": (2, 1, 1),
                       "groups": 6}, 7),
    (DepthwiseConv3d, {"kernel_size": (4, 1, 1), "stride": (1, 2, 2), "padding": (1, 0, 0),
                       "groups": 6, "bias": False}, 9),
    (DepthwiseConv3d, {"kernel_size": (2, 1, 1), "groups": 6}, 5),
    (GemmConv3d, {"kernel_size": (3, 1, 1), "padding": (1, 0, 0)}, 7),
    (GemmConv3d, {"kernel_size": 1, "stride": (1, 2, 2)}, 7),
    (ReplicateConv3d, {"kernel_size": 3, "padding": 1}, 7),
])
def test_zoo_convolutions_stream_exactly(cls: type, kwargs: dict, size: int,
                                         dtype: torch.dtype) -> None:
    conv = cls(6, 6, **kwargs).to(dtype)
    ref = nn.Conv3d(6, 6, **kwargs).to(dtype)
    ref.load_state_dict(conv.state_dict())
    reference = ref if cls is not ReplicateConv3d else _replicate_reference(conv)
    x = torch.randn(2, 6, 8, size, size, dtype=dtype)
    assert_streaming_equivalent(conv, x, reference)


def test_temporal_filter_keeps_its_own_frames() -> None:
    """The k x 1 x 1 depthwise filter keeps past frames in its state: refilling the caller's
    frame tensor in place must not change them (nor the outputs still to come)."""
    conv = DepthwiseConv3d(4, 4, (3, 1, 1), padding=(2, 0, 0), groups=4).double()
    clip = torch.randn(1, 4, 6, 3, 5, dtype=torch.float64)
    buffer = torch.empty(1, 4, 3, 5, dtype=torch.float64)
    outs = []
    for t in range(clip.shape[2]):
        buffer.copy_(clip[:, :, t])
        outs.append(conv.forward_step(buffer))
    expected = nn.functional.conv3d(clip, conv.weight, conv.bias, padding=(2, 0, 0), groups=4)
    # padding 2 before the stream: every step emits, output t ends at frame t
    torch.testing.assert_close(torch.stack(outs, 2), expected[:, :, :6])
    assert isinstance(conv.get_state()["tree"]["frames"], tuple)


def _replicate_reference(conv: nn.Module):
    """Time padded by copies of the first and last frames, space by zeros (3x3x3, padding 1)."""
    def reference(x: torch.Tensor) -> torch.Tensor:
        padded = torch.cat([x[:, :, :1], x, x[:, :, -1:]], dim=2)
        padded = nn.functional.pad(padded, (1, 1, 1, 1))
        return nn.functional.conv3d(padded, conv.weight, conv.bias)

    return reference


def test_replicate_fill_pads_time_by_copies_and_space_by_zeros() -> None:
    conv = conv3d(4, 4, 3, padding=1, fill="replicate", bias=True).double()
    x = torch.randn(1, 4, 6, 5, 5, dtype=torch.float64)
    padded = torch.cat([x[:, :, :1], x, x[:, :, -1:]], dim=2)
    padded = nn.functional.pad(padded, (1, 1, 1, 1))
    expected = nn.functional.conv3d(padded, conv.weight, conv.bias)
    torch.testing.assert_close(conv(x), expected)
    assert isinstance(conv3d(4, 4, (3, 1, 1), padding=(1, 0, 0), fill="replicate"), GemmConv3d)
    assert type(conv3d(4, 8, 3, padding=1)) is cs.Conv3d
