"""Continual attention on sharply peaked attention and on non-finite tokens.

The reference is always torch: ``torch.nn`` attention or encoders applied to every window of the
stream. Peaked attention: the query/key projections are scaled by 4, 8 or 16 (scores by 16 to
256), so the key leaving the window often holds nearly all of a query's weight.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import costream as cs
from modules._stepping import stepped

D, HEADS, FF, N, T = 8, 2, 16, 4, 12

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread


def encoder(layers: int, norm_first: bool, scale: float, dtype: torch.dtype,
            seed: int = 0) -> nn.TransformerEncoder:
    """A torch encoder whose q/k projections are scaled by ``scale`` (peaked attention)."""
    torch.manual_seed(seed)
    layer = nn.TransformerEncoderLayer(D, HEADS, FF, dropout=0.0, norm_first=norm_first,
                                       batch_first=True)
    enc = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
    with torch.no_grad():
        for lay in enc.layers:
            lay.self_attn.in_proj_weight[:2 * D].mul_(scale)
    return enc.to(dtype).eval()


def sliding(model: nn.Module, x: Tensor) -> Tensor:
    """``model`` (batch first) on every window of ``N`` tokens of ``x`` ``(B, d, T)``: the
    newest token's output, ``(B, d, T - N + 1)``."""
    windows = x.unfold(2, N, 1).permute(0, 2, 3, 1)  # (B, T', N, d)
    with torch.no_grad():
        y = model(windows.reshape(-1, N, x.shape[1])).reshape(*windows.shape)
    return y[:, :, -1].transpose(1, 2)


def chunked(module: cs.CoModule, x: Tensor, sizes: tuple[int, ...] = (3, 1, 5)) -> Tensor:
    """``forward_steps`` over chunks of ``sizes`` (then the rest)."""
    module.reset_state()
    outs, start = [], 0
    with torch.no_grad():
        for size in (*sizes, x.shape[2]):
            y = module.forward_steps(x[:, :, start:start + size])
            start += size
            if y is not None:
                outs.append(y)
            if start >= x.shape[2]:
                break
    module.reset_state()
    return torch.cat(outs, 2)


def max_err(y: Tensor, ref: Tensor) -> float:
    return float((y.double() - ref.double()).abs().max())


# ---------------------------------------------------------------------- peaked attention
def test_repro_leaving_key_held_all_the_weight():
    """The leaving token held all of the oldest query's weight (score gap 29): the running sums
    cancelled to 0 / 0 and gave NaN; torch gives [0.802, 0.198]."""
    att = cs.RetroactiveMultiheadAttention(2, 1, window=3, bias=False).eval()
    with torch.no_grad():
        att.in_proj_weight.copy_(torch.eye(2).repeat(3, 1))
        att.out_proj.weight.copy_(torch.eye(2))
    x = torch.tensor([[[30., 1., 0., 1.], [0., 0., 1., 0.]]])
    with torch.no_grad():
        y = [att.forward_step(x[:, :, t]) for t in range(4)][3]  # (1, 2, 3): all 3 outputs
        w = x[0, :, 1:].T.unsqueeze(1)  # the last window, (n, 1, d)
        ref = nn.MultiheadAttention.forward(att, w, w, w, need_weights=False)[0]
    torch.testing.assert_close(y[0, :, 0], torch.tensor([0.802, 0.198]), rtol=0, atol=1e-3)
    torch.testing.assert_close(y[0].T, ref[:, 0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("scale", [4, 8, 16])
def test_retroactive_attention_float32_within_torchs_own_error(scale):
    torch.manual_seed(scale)
    mha = nn.MultiheadAttention(D, HEADS, batch_first=True).double().eval()
    with torch.no_grad():
        mha.in_proj_weight[:2 * D].mul_(scale)
    x = torch.randn(2, D, T, dtype=torch.float64)
    with torch.no_grad():  # torch's attention on each window, all N outputs
        ref = cs.RetroactiveMultiheadAttention.from_torch(mha, N)(x)
    mha32 = nn.MultiheadAttention(D, HEADS, batch_first=True).eval()
    mha32.load_state_dict(mha.state_dict())
    co = cs.RetroactiveMultiheadAttention.from_torch(mha32, N).eval()
    x32 = x.float()
    with torch.no_grad():
        torch_err = max_err(co(x32), ref)
    assert 0 < torch_err < 1e-3
    for y in (stepped(co, x32), chunked(co, x32)):
        assert torch.isfinite(y).all()
        assert max_err(y, ref) <= 10 * torch_err


@pytest.mark.parametrize("layers", [1, 2, 3, 5])
@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("scale", [4, 8, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_peaked_attention_encoder_matches_torch_on_each_window(layers, norm_first, scale, dtype):
    """Stepped (and chunked) outputs of ``continual(encoder)`` against the torch encoder on each
    window: float64 to 1e-9; float32 within 10x of torch's own float32 error (torch's float32
    encoder against the float64 one)."""
    src64 = encoder(layers, norm_first, scale, torch.float64)
    x = torch.randn(2, D, T, dtype=torch.float64)
    ref = sliding(src64, x)
    src = encoder(layers, norm_first, scale, dtype)
    co = cs.continual(src, temporal_window=N).eval()
    xs = x.to(dtype)
    for y in (stepped(co, xs), chunked(co, xs)):
        assert torch.isfinite(y).all()
        if dtype == torch.float64:
            torch.testing.assert_close(y, ref, rtol=1e-9, atol=1e-9)
        else:
            torch_err = max_err(sliding(src, xs), ref)
            assert max_err(y, ref) <= 10 * torch_err, (max_err(y, ref), torch_err)


def test_attention_option_selects_the_update():
    """``continual(..., attention=...)`` reaches the layers' ``recompute`` flag; the running sums
    really are a different computation (they fail on peaked attention where exact does not)."""
    src = encoder(2, False, 8, torch.float32)
    x = torch.randn(2, D, T)
    exact = cs.continual(src, temporal_window=N)
    running = cs.continual(src, temporal_window=N, attention="running")
    assert exact.recompute and exact.layers[0].recompute
    assert not running.recompute and not running.layers[0].recompute
    assert cs.continual(src.layers[0], temporal_window=N, attention="running").recompute is False
    assert torch.isfinite(stepped(exact, x)).all()
    assert not torch.isfinite(stepped(running, x)).all()
    with pytest.raises(ValueError, match="attention must be 'exact' or 'running'"):
        cs.continual(src, temporal_window=N, attention="retroactive")


# ---------------------------------------------------------------------- non-finite tokens
def poisoned(batch: int = 2, length: int = 20) -> Tensor:
    x = torch.randn(batch, D, length, dtype=torch.float64)
    x[0, 3, 5] = float("nan")
    x[1, :, 11] = float("inf")
    return x


@pytest.mark.parametrize("layers", [1, 2, 3])
@pytest.mark.parametrize("norm_first", [False, True])
def test_non_finite_outputs_exactly_where_the_window_computation_has_them(layers, norm_first):
    src = encoder(layers, norm_first, 1.0, torch.float64, seed=layers)
    co = cs.continual(src, temporal_window=N).eval()
    x = poisoned()
    expected = torch.isfinite(sliding(src, x))
    assert not expected.all() and expected.any()
    for y in (stepped(co, x), chunked(co, x)):
        assert torch.equal(torch.isfinite(y), expected)
        torch.testing.assert_close(y[expected], sliding(src, x)[expected], rtol=1e-9, atol=1e-9)


def test_non_finite_retroactive_attention_and_running_sums():
    """Default: non-finite exactly where torch's attention over the window is. Running sums
    (documented): a non-finite token stays non-finite in at most ``N - 1`` more outputs."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(D, HEADS, batch_first=True).double().eval()
    x = poisoned()
    with torch.no_grad():
        expected = torch.isfinite(cs.RetroactiveMultiheadAttention.from_torch(mha, N)(x))
    expected = expected.all(1).all(-1)  # (B, T'): windows whose outputs are all finite
    exact = cs.RetroactiveMultiheadAttention.from_torch(mha, N).eval()
    assert torch.equal(torch.isfinite(stepped(exact, x)).all(1).all(-1), expected)
    running = cs.RetroactiveMultiheadAttention.from_torch(mha, N, recompute=False).eval()
    finite = torch.isfinite(stepped(running, x)).all(1).all(-1)
    assert (finite <= expected).all() and not torch.equal(finite, expected)
    bad = F.pad((~expected).double().unsqueeze(1), (N - 1, 0))
    late = F.max_pool1d(bad, N, 1).squeeze(1).bool()  # non-finite in one of the last N windows
    assert (~finite <= late).all()


# ---------------------------------------------------------------------- both updates deploy
def test_both_updates_compile_as_one_graph_and_export_to_onnx(tmp_path):
    """The exact default is covered by ``tests/test_compile.py`` and ``tests/export``; the
    running sums (no longer the default) still compile with ``fullgraph=True`` and export."""
    pytest.importorskip("onnxruntime")
    from costream.export import OnnxStreamRunner, export_onnx
    from costream.runtime import compile_step

    src = encoder(2, True, 1.0, torch.float32)
    net = cs.continual(src, temporal_window=N, attention="running").eval()
    x = torch.randn(2, D, 3 * N)
    expected = sliding(src, x)
    compiled = compile_step(net, backend="eager")  # fullgraph=True: fails on a graph break
    state = net.init_state(2, (D,))
    outs = []
    with torch.no_grad():
        for t in range(x.shape[2]):
            with torch._dynamo.config.patch(error_on_recompile=t > 0):
                y, state = compiled(x[:, :, t:t + 1], state)  # one stride (1 frame)
            if bool(net.ready(state).all()):
                outs.append(y)
    torch.testing.assert_close(torch.stack(outs, 2), expected, rtol=1e-4, atol=1e-4)
    export_onnx(net, tmp_path / "enc.onnx", (D,), batch_size=2)
    got = OnnxStreamRunner(tmp_path / "enc.onnx").run(x.numpy())
    torch.testing.assert_close(torch.from_numpy(np.stack(got, 2)), expected, rtol=1e-4,
                               atol=1e-4)
