"""Graph conversion: models with a custom ``forward`` convert by tracing, exactly."""

from __future__ import annotations

import importlib.util
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import weight_norm
from torch.nn.utils.parametrizations import weight_norm as weight_norm_new

import costream as cs
from costream.testing import assert_streaming_equivalent

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:.*weight_norm.*:FutureWarning")]


# ---------------------------------------------------------------------- models
class Chomp1d(nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n

    def forward(self, x):
        return x[:, :, :-self.n].contiguous()


class TemporalBlock(nn.Module):
    """locuslab TCN block: padded weight-normed convs, chomps, a 1x1 downsample residual."""

    def __init__(self, cin: int, cout: int, k: int, d: int, wn) -> None:
        super().__init__()
        p = (k - 1) * d
        self.conv1 = wn(nn.Conv1d(cin, cout, k, padding=p, dilation=d))
        self.conv2 = wn(nn.Conv1d(cout, cout, k, padding=p, dilation=d))
        self.net = nn.Sequential(self.conv1, Chomp1d(p), nn.ReLU(), nn.Dropout(0.2),
                                 self.conv2, Chomp1d(p), nn.ReLU(), nn.Dropout(0.2))
        self.downsample = nn.Conv1d(cin, cout, 1) if cin != cout else None
        self.relu = nn.ReLU()

    def forward(self, x):
        res = x if self.downsample is None else self.downsample(x)
        return self.relu(self.net(x) + res)


class TCN(nn.Module):
    def __init__(self, wn) -> None:
        super().__init__()
        self.network = nn.Sequential(TemporalBlock(3, 6, 3, 1, wn), TemporalBlock(6, 6, 3, 2, wn),
                                     TemporalBlock(6, 4, 2, 4, wn))

    def forward(self, x):
        return self.network(x)


class WaveNet(nn.Module):
    """Dilated causal convs (F.pad), tanh x sigmoid gates, residual and skip sums."""

    def __init__(self, c: int = 6, layers: int = 4) -> None:
        super().__init__()
        self.inp = nn.Conv1d(1, c, 1)
        self.filt = nn.ModuleList(nn.Conv1d(c, c, 2, dilation=2 ** i) for i in range(layers))
        self.gate = nn.ModuleList(nn.Conv1d(c, c, 2, dilation=2 ** i) for i in range(layers))
        self.res = nn.ModuleList(nn.Conv1d(c, c, 1) for _ in range(layers))
        self.skip = nn.ModuleList(nn.Conv1d(c, c, 1) for _ in range(layers))
        self.out = nn.Conv1d(c, 3, 1)

    def forward(self, x):
        h, skips = self.inp(x), 0
        for i, (f, g, r, s) in enumerate(zip(self.filt, self.gate, self.res, self.skip)):
            xp = F.pad(h, (2 ** i, 0))
            z = torch.tanh(f(xp)) * torch.sigmoid(g(xp))
            skips = skips + s(z)
            h = h + r(z)
        return self.out(F.relu(skips))


class UnpaddedWaveNet(nn.Module):
    """The original layout: unpadded convs, the residual cropped with ``x[:, :, d:]``."""

    def __init__(self, c: int = 5) -> None:
        super().__init__()
        self.filt = nn.ModuleList(nn.Conv1d(c, c, 2, dilation=2 ** i) for i in range(3))
        self.gate = nn.ModuleList(nn.Conv1d(c, c, 2, dilation=2 ** i) for i in range(3))

    def forward(self, x):
        for i, (f, g) in enumerate(zip(self.filt, self.gate)):
            x = x[:, :, 2 ** i:] + torch.tanh(f(x)) * torch.sigmoid(g(x))
        return x


class DownBlock(nn.Module):
    """A 3D residual block: spatially strided branch, 1x1 strided shortcut, concatenation."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv3d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm3d(4)
        self.b = nn.Conv3d(4, 4, (3, 1, 1), stride=(1, 2, 2), padding=(1, 0, 0))
        self.sc = nn.Conv3d(3, 4, 1, stride=(1, 2, 2))
        self.side = nn.Conv3d(3, 2, (5, 1, 1), stride=(1, 2, 2), padding=(2, 0, 0))

    def forward(self, x):
        y = torch.relu(self.b(torch.relu(self.bn(self.a(x)))) + self.sc(x))
        return torch.cat([y, self.side(x)], dim=1)


class DSCNN(nn.Module):
    """Hello-Edge DS-CNN keyword spotter over a (mel x time) input ``(B, 1, mel, T)``."""

    def __init__(self, c: int = 8, n: int = 2, classes: int = 5) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, c, (5, 4), stride=(1, 2), padding=(1, 0))
        self.bn1 = nn.BatchNorm2d(c)
        self.dw = nn.ModuleList(nn.Conv2d(c, c, 3, groups=c) for _ in range(n))
        self.pw = nn.ModuleList(nn.Conv2d(c, c, 1) for _ in range(n))
        self.bn = nn.ModuleList(nn.BatchNorm2d(c) for _ in range(n))
        self.fc = nn.Linear(c, classes)

    def forward(self, x):  # (B, 1, mel, T): time is the last axis of every conv
        x = F.relu(self.bn1(self.conv1(x)))
        for dw, pw, bn in zip(self.dw, self.pw, self.bn):
            x = F.relu(bn(pw(F.relu(dw(x)))))
        x = x.mean(dim=(2, 3))
        return self.fc(x)


def _randomize(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.3, 0.3)
    return model.eval()


def _exact(model: nn.Module, x: torch.Tensor) -> cs.CoModule:
    """Convert, check the state_dict keys and the whole streaming contract (float64)."""
    model = _randomize(model.double())
    x = x.double()
    net = cs.continual(model, example=x)
    assert isinstance(net, cs.Graph)
    assert list(net.state_dict()) == list(model.state_dict())
    assert_streaming_equivalent(net, x, model)
    return net


# ---------------------------------------------------------------------- exactness
@pytest.mark.parametrize("wn", [weight_norm, weight_norm_new], ids=["old-style", "new-style"])
def test_locuslab_tcn_with_weight_norm(wn):
    torch.manual_seed(0)
    net = _exact(TCN(wn), torch.randn(2, 3, 40))
    assert net.delay == 0  # causal: padded convs with chomps


def test_wavenet_causal_padding_adds_no_latency():
    torch.manual_seed(0)
    net = _exact(WaveNet(), torch.randn(2, 1, 40))
    assert net.delay == 0  # F.pad went into the convs' partial sums
    assert net.receptive_field == 16


def test_unpadded_wavenet_crops_the_residual():
    torch.manual_seed(0)
    net = _exact(UnpaddedWaveNet(), torch.randn(2, 5, 24))
    assert net.delay == 7 and net.receptive_field == 8


def test_residual_3d_block_aligns_branches_of_different_delays():
    torch.manual_seed(0)
    net = _exact(DownBlock(), torch.randn(2, 3, 9, 6, 6))
    assert net.delay == 2


def test_window_classifier_streams_over_a_sliding_window():
    """A DS-CNN with time last: each output equals the model run on that window."""
    torch.manual_seed(0)
    model = _randomize(DSCNN().double())
    window, clip = 18, torch.randn(2, 1, 10, 40, dtype=torch.float64)
    net = cs.continual(model, example=clip[..., :24], time_dim=3, temporal_window=window)
    assert list(net.state_dict()) == list(model.state_dict())
    rf = net.receptive_field
    assert rf == window  # the window the model classifies, in input frames
    outs = [net.forward_step(clip[..., t]) for t in range(clip.shape[3])]
    due = [(t, y) for t, y in enumerate(outs) if y is not None]
    assert due and due[0][0] == net.delay
    for t, y in due:
        ref = model(clip[..., t - rf + 1: t + 1])
        torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)
    # offline: the prediction of every window, stacked on dim 2 (one for a window-long clip)
    torch.testing.assert_close(net(clip[..., :window]), model(clip[..., :window]).unsqueeze(2),
                               rtol=1e-10, atol=1e-10)
    offline = net(clip)
    assert offline.shape[2] == (clip.shape[3] - window) // net.stride + 1
    net.reset_state()
    torch.testing.assert_close(net.forward_steps(clip, pad_end=True), offline, rtol=1e-10,
                               atol=1e-10)
    net.reset_state()
    parts = [net.forward_steps(clip[..., :17]), net.forward_steps(clip[..., 17:])]
    torch.testing.assert_close(torch.cat([p for p in parts if p is not None], 2), offline,
                               rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------------- third-party models
def _ptv(name: str):
    """A PyTorchVideo builder; its package imports one name of torchvision at import time."""
    if importlib.util.find_spec("pytorchvideo") is None:
        pytest.skip("pytorchvideo is not installed")
    module, fn = name.rsplit(".", 1)
    stand_in = "torchvision" not in sys.modules and importlib.util.find_spec("torchvision") is None
    if stand_in:
        tv, ops = types.ModuleType("torchvision"), types.ModuleType("torchvision.ops")
        ops.RoIAlign = type("RoIAlign", (nn.Module,), {})
        tv.ops = ops
        sys.modules.update({"torchvision": tv, "torchvision.ops": ops})
    try:
        return getattr(importlib.import_module(f"pytorchvideo.models.{module}"), fn)
    finally:
        if stand_in:
            sys.modules.pop("torchvision", None)
            sys.modules.pop("torchvision.ops", None)


@pytest.mark.parametrize("builder", ["resnet.create_resnet", "csn.create_csn",
                                     "r2plus1d.create_r2plus1d"])
def test_pytorchvideo_builders(builder):
    torch.manual_seed(0)
    kw = {"input_channel": 3, "model_depth": 50, "model_num_class": 4, "stem_dim_out": 4}
    if builder.endswith("create_resnet"):
        kw["norm"] = nn.BatchNorm3d
    model = _ptv(builder)(**kw)
    model.blocks = model.blocks[:3]  # stem and two stages: the streaming part, kept small
    model = _randomize(model.double())
    x = torch.randn(2, 3, 8, 16, 16, dtype=torch.float64)
    net = cs.continual(model, example=x)
    assert list(net.state_dict()) == list(model.state_dict())
    assert_streaming_equivalent(net, x, model, check_batch=False)


def test_wav2vec2_feature_encoder_layer_norm():
    pytest.importorskip("transformers")
    from transformers import Wav2Vec2Config
    from transformers.models.wav2vec2.modeling_wav2vec2 import Wav2Vec2FeatureEncoder

    torch.manual_seed(0)
    cfg = Wav2Vec2Config(feat_extract_norm="layer", conv_dim=(6, 6, 6),
                         conv_kernel=(10, 3, 2), conv_stride=(5, 2, 2), conv_bias=True)
    model = Wav2Vec2FeatureEncoder(cfg).double().eval()
    x = torch.randn(2, 400, dtype=torch.float64)  # raw samples (B, T): time_dim=1
    net = cs.continual(model, example=x, time_dim=1)
    assert list(net.state_dict()) == list(model.state_dict())
    assert net.stride == 20 and net.receptive_field == 30
    ref = model(x)
    torch.testing.assert_close(net.forward_steps(x, pad_end=True), ref, rtol=1e-10,
                               atol=1e-10)
    net.reset_state()
    outs = [net.forward_step(x[:, t]) for t in range(x.shape[1])]
    got = torch.stack([y for y in outs if y is not None], 2)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)
    net.reset_state()
    assert_streaming_equivalent(net, x, model)  # clips (B, T): the harness follows time_dim


class TokensFirst(nn.Module):
    """A (B, T, C) model, as sequence and audio code writes them."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(4, 6, 3, padding=2)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = self.conv(x.transpose(1, 2))[..., :-2]
        return self.head(torch.relu(h).transpose(1, 2))


def test_time_first_layout():
    torch.manual_seed(0)
    model = TokensFirst().double().eval()
    x = torch.randn(2, 15, 4, dtype=torch.float64)
    net = cs.continual(model, example=x, time_dim=1)
    assert net.delay == 0 and net.forward_step(x[:, 0]).shape == (2, 3)
    net.reset_state()
    assert_streaming_equivalent(net, x, model)


# ---------------------------------------------------------------------- refusals
class SE3d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(3, 4, 3, padding=1)
        self.fc = nn.Conv3d(4, 4, 1)

    def forward(self, x):
        x = self.conv(x)
        return x * torch.sigmoid(self.fc(x.mean((2, 3, 4), keepdim=True)))


class ClipAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(4, 4, 3, padding=1)
        self.q = nn.Linear(4, 4)
        self.norm = nn.GroupNorm(2, 4)

    def forward(self, x):
        h = self.conv(x).transpose(1, 2)
        a = torch.softmax(self.q(h) @ h.transpose(1, 2), -1)
        return self.norm((a @ h).transpose(1, 2))


def test_every_blocker_in_one_report():
    with pytest.raises(cs.NotStreamableError) as info:
        cs.continual(ClipAttention(), example=torch.randn(1, 4, 10))
    err = info.value
    ops = [b.op for b in err.blockers]
    assert ops.count("operator.matmul") == 2 and "GroupNorm" in ops
    assert all(b.reason and b.line.startswith(__file__) for b in err.blockers)
    assert "norm" in [b.path for b in err.blockers]
    assert str(err).count("\n") == len(err.blockers)


def test_clip_level_squeeze_excitation_is_refused():
    with pytest.raises(cs.NotStreamableError, match="over time"):
        cs.continual(SE3d(), example=torch.randn(1, 3, 6, 4, 4))
    with pytest.raises(cs.NotStreamableError, match="squeeze-excitation"):
        cs.continual(SE3d(), example=torch.randn(1, 3, 6, 4, 4), temporal_window=6)


def test_group_norm_wav2vec2_is_refused():
    pytest.importorskip("transformers")
    from transformers import Wav2Vec2Config
    from transformers.models.wav2vec2.modeling_wav2vec2 import Wav2Vec2FeatureEncoder

    cfg = Wav2Vec2Config(feat_extract_norm="group", conv_dim=(4, 4), conv_kernel=(10, 3),
                         conv_stride=(5, 2))
    with pytest.raises(cs.NotStreamableError, match="normalises over time") as info:
        cs.continual(Wav2Vec2FeatureEncoder(cfg).eval(), example=torch.randn(1, 200),
                     time_dim=1)
    assert [b.path for b in info.value.blockers] == ["conv_layers.0.layer_norm"]


def test_x3d_clip_level_se_is_refused():
    model = _ptv("x3d.create_x3d")(input_clip_length=4, input_crop_size=32, depth_factor=0.5,
                           model_num_class=3).eval()
    with pytest.raises(cs.NotStreamableError) as info:
        cs.continual(model, example=torch.randn(1, 3, 4, 32, 32))
    assert any("squeeze" in b.reason or "over time" in b.reason for b in info.value.blockers)


def test_container_of_time_mixing_module_gets_no_pointwise_hint():
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv1d(2, 2, 3)

        def forward(self, x):
            return self.conv(x) * 2

    with pytest.raises(TypeError) as info:
        cs.Sequential(Block())
    assert "register_pointwise" not in str(info.value)
    assert "example=" in str(info.value)


# ---------------------------------------------------------------------- a first-class module
def test_source_checkpoint_loads_into_the_converted_model():
    torch.manual_seed(0)
    model = WaveNet().eval()
    x = torch.randn(1, 1, 20)
    net = cs.continual(model, example=x)
    other = WaveNet().eval()
    net.load_state_dict(other.state_dict())
    torch.testing.assert_close(net(x), other(x), rtol=0, atol=0)
    torch.testing.assert_close(net.forward_steps(x, pad_end=True), other(x), rtol=1e-5,
                               atol=1e-6)


def test_compiled_step_has_no_graph_break():
    from costream.runtime import compile_step

    torch.manual_seed(0)
    model = TCN(weight_norm_new).eval()
    clip = torch.randn(2, 3, 24)
    net = cs.continual(model, example=clip)
    with torch.no_grad():
        ref = model(clip)
    step = compile_step(net, backend="eager")  # fullgraph=True: a graph break raises
    state = net.init_state(2, (3,))
    with torch.no_grad():
        for t in range(24):
            y, state = step(clip[:, :, t:t + 1], state)
            torch.testing.assert_close(y, ref[:, :, t], rtol=1e-4, atol=1e-5)


def test_pruning_sees_the_source_parameters():
    pytest.importorskip("torch_pruning")
    model = WaveNet().eval()
    net = cs.continual(model, example=torch.randn(1, 1, 16))
    assert {id(p) for p in net.parameters()} == {id(p) for p in model.parameters()}


def test_converting_guide_example_runs():
    import re
    from pathlib import Path

    page = Path(__file__).resolve().parents[2] / "docs" / "converting.md"
    block = re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)[0]
    namespace: dict = {}
    exec(compile(block, str(page), "exec"), namespace)
    assert namespace["net"].delay == 0


def test_conversion_changes_nothing_in_the_source_model():
    """Propagating the example runs the model: batch statistics and modes stay as they were."""
    model = DownBlock()
    model.train()
    model.bn.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    net = cs.continual(model, example=torch.randn(2, 3, 6, 4, 4))
    assert model.training and not model.bn.training and model.a.training
    assert net.training and not net.bn.training
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def _wav2vec2_layer_norm():
    from transformers import Wav2Vec2Config
    from transformers.models.wav2vec2.modeling_wav2vec2 import Wav2Vec2FeatureEncoder

    cfg = Wav2Vec2Config(feat_extract_norm="layer", conv_dim=(6, 6), conv_kernel=(10, 3),
                         conv_stride=(5, 2), conv_bias=True)
    return Wav2Vec2FeatureEncoder(cfg)


# model, example clip (float32), conversion options, whether the ONNX export is checked too
STREAMED = {
    "tcn": (lambda: TCN(weight_norm), (2, 3, 24), {}, True),
    "wavenet": (WaveNet, (2, 1, 24), {}, False),
    "unpadded wavenet": (UnpaddedWaveNet, (2, 5, 20), {}, False),
    "3d residual": (DownBlock, (2, 3, 8, 6, 6), {}, True),
    "ds-cnn": (DSCNN, (2, 1, 10, 30), {"time_dim": 3, "temporal_window": 18}, True),
    "wav2vec2": (_wav2vec2_layer_norm, (2, 200), {"time_dim": 1}, True),
    "r2plus1d": (lambda: _ptv_stages("r2plus1d.create_r2plus1d"), (2, 3, 8, 16, 16), {}, False),
}


def _ptv_stages(builder: str) -> nn.Module:
    model = _ptv(builder)(input_channel=3, model_depth=50, model_num_class=4, stem_dim_out=4)
    model.blocks = model.blocks[:2]
    return model


@pytest.mark.parametrize("name", list(STREAMED))
def test_stream_engine_and_onnxruntime_match_stepping(name, tmp_path):
    """float32: StreamEngine (two streams) and the exported step equal forward_step at 1e-4."""
    if name == "wav2vec2":
        pytest.importorskip("transformers")
    torch.manual_seed(0)
    factory, shape, options, check_onnx = STREAMED[name]
    model = _randomize(factory())
    x = torch.randn(*shape)
    net = cs.continual(model, example=x, **options).eval()
    td = net.time_dim
    frames = x.movedim(td, 0)  # (T, B, ...)
    with torch.no_grad():
        net.reset_state()
        ref = [net.forward_step(f) for f in frames]
        frame_shape = tuple(frames.shape[2:]) or (1,)
        from costream.runtime import StreamEngine

        engine = StreamEngine(net, capacity=2, frame_shape=frame_shape)
        ids = [engine.open(), engine.open()]
        for f, y in zip(frames, ref):
            out = engine.step({i: f[k].reshape(frame_shape) for k, i in enumerate(ids)})
            if y is None:
                continue
            got = torch.stack([out[i] for i in ids])
            torch.testing.assert_close(got, y, rtol=1e-4, atol=1e-4)
    if not check_onnx:
        return
    pytest.importorskip("onnxruntime")
    from costream.export import OnnxStreamRunner, export_onnx

    export_onnx(net, tmp_path / "m.onnx", frame_shape, batch_size=2, optimize=False)
    clip = frames.reshape(frames.shape[0], 2, *frame_shape).movedim(0, 2)
    got = OnnxStreamRunner(tmp_path / "m.onnx").run(clip.numpy())
    due = [y for y in ref if y is not None]
    assert len(got) == len(due) > 0
    for a, b in zip(got, due):
        np.testing.assert_allclose(a, b.numpy(), rtol=1e-4, atol=1e-4)


def test_pruning_a_converted_graph_keeps_it_exact():
    pytest.importorskip("torch_pruning")
    from costream.prune import prune

    torch.manual_seed(0)
    for model, x in ((WaveNet(layers=2), torch.randn(2, 1, 20)),
                     (DownBlock(), torch.randn(2, 3, 6, 6, 6))):
        model = _randomize(model.double())
        x = x.double()
        net = cs.continual(model, example=x)
        before = sum(p.numel() for p in net.parameters())
        prune(net, x[:1], "l1", density=0.5)
        assert sum(p.numel() for p in net.parameters()) < before
        with torch.no_grad():
            offline = net(x)
        assert_streaming_equivalent(net, x, offline)
    with pytest.raises(ValueError, match="weight norm"):
        prune(cs.continual(TCN(weight_norm_new), example=torch.randn(1, 3, 12)),
              torch.randn(1, 3, 12), "l1", density=0.5)


class StridedResidual(nn.Module):
    """Temporal stride 2 with a 1x1 strided shortcut: the branches' frames arrive one step
    apart (a delay that is not a multiple of the stride)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv1d(4, 6, 3, stride=2, padding=1)
        self.b = nn.Conv1d(6, 6, 3, padding=1)
        self.sc = nn.Conv1d(4, 6, 1, stride=2)

    def forward(self, x):
        return torch.relu(self.b(torch.relu(self.a(x))) + self.sc(x))


class GatedChunks(nn.Module):
    """``chunk`` into a tuple of streams, a GLU, and sizes read from the input."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(4, 8, 3, padding=2)
        self.proj = nn.Linear(4, 5)
        self.norm = nn.LayerNorm(5)

    def forward(self, x):
        h = self.conv(x)[..., :-2]
        a, b = h.chunk(2, dim=1)
        g = a * torch.sigmoid(b) + F.glu(h, dim=1)
        y = self.norm(self.proj(g.permute(0, 2, 1)))  # (B, T, C): features last
        return y.transpose(1, 2).reshape(x.size(0), 5, -1)


class PaddingModules(nn.Module):
    """Causal padding with nn.ConstantPad1d modules, grouped convs, and F.pad of time and
    channels at once with a keyword value."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.ConstantPad1d((2, 0), 0.0), nn.Conv1d(4, 8, 3, groups=2),
                                 nn.BatchNorm1d(8), nn.ReLU(), nn.ConstantPad1d((4, 0), 0.0),
                                 nn.Conv1d(8, 8, 3, dilation=2))

    def forward(self, x):
        wide = F.pad(x.unsqueeze(1), (1, 0, 0, 4), value=0.5).squeeze(1)[:, :, :-1]
        return self.net(x) + wide


@pytest.mark.parametrize("model", [StridedResidual, GatedChunks, PaddingModules])
def test_everyday_blocks(model):
    torch.manual_seed(0)
    _exact(model(), torch.randn(2, 4, 21))


def test_bad_input_is_one_readable_line():
    model = WaveNet()
    for kwargs, match in (({"example": torch.randn(1, 5, 10)}, "example clip"),
                          ({"time_dim": 0}, "time_dim"),
                          ({"example": torch.randn(4)}, "example must be a clip")):
        with pytest.raises(ValueError, match=match) as info:
            cs.continual(model, **kwargs)
        assert "\n" not in str(info.value)
