"""Continual Transformer encoders against ``torch.nn.TransformerEncoder`` over sliding windows."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import costream as cs
from costream.testing import assert_streaming_equivalent
from modules._stepping import stepped

D, HEADS, FF, N = 16, 4, 24, 5


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread


def torch_encoder(layers: int, norm_first: bool = False, activation: object = "relu",
                  batch_first: bool = True, final_norm: bool = False,
                  dtype: torch.dtype = torch.float64, seed: int = 0) -> nn.TransformerEncoder:
    torch.manual_seed(seed)
    layer = nn.TransformerEncoderLayer(D, HEADS, FF, dropout=0.0, activation=activation,
                                       norm_first=norm_first, batch_first=batch_first)
    enc = nn.TransformerEncoder(layer, layers, norm=nn.LayerNorm(D) if final_norm else None,
                                enable_nested_tensor=False)
    for p in enc.parameters():  # non-trivial norms and biases
        if p.dim() == 1:
            nn.init.uniform_(p, -0.5, 1.5)
    return enc.to(dtype).eval()


def sliding(model: nn.Module, x: Tensor, n: int, query_index: int, batch_first: bool) -> Tensor:
    """``model`` applied to every window of ``n`` tokens of ``x`` ``(B, d, T)``: the output at
    ``query_index`` of each window, ``(B, d, T - n + 1)``."""
    outs = []
    with torch.no_grad():
        for s in range(x.shape[2] - n + 1):
            w = x[:, :, s:s + n].permute(0, 2, 1)  # (B, n, d)
            y = model(w) if batch_first else model(w.transpose(0, 1)).transpose(0, 1)
            outs.append(y[:, query_index])
    return torch.stack(outs, 2)


@pytest.mark.parametrize("layers", [1, 2, 3, 4])
@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_forward_step_equals_torch_encoder_on_each_window(layers, norm_first, activation):
    src = torch_encoder(layers, norm_first, activation, batch_first=layers % 2 == 0)
    co = cs.continual(src, temporal_window=N)
    x = torch.randn(2, D, 10, dtype=torch.float64)
    ref = sliding(src, x, N, -1, src.layers[0].self_attn.batch_first)
    torch.testing.assert_close(stepped(co, x), ref, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(co(x), ref, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize(("layers", "query_index", "batch_first"),
                         [(1, 0, False), (1, -2, True), (2, 0, True), (2, 2, False),
                          (3, 1, True), (4, -3, False)])
def test_chosen_query_index_and_final_norm(layers, query_index, batch_first):
    src = torch_encoder(layers, batch_first=batch_first, final_norm=True, seed=layers)
    co = cs.TransformerEncoder.from_torch(src, N, query_index=query_index)
    x = torch.randn(3, D, 10, dtype=torch.float64)
    ref = sliding(src, x, N, query_index, batch_first)
    torch.testing.assert_close(stepped(co, x), ref, rtol=1e-9, atol=1e-9)
    if layers in (1, 2):
        assert_streaming_equivalent(co, x, lambda _: ref)


def test_callable_activation_and_no_bias():
    torch.manual_seed(3)
    layer = nn.TransformerEncoderLayer(D, HEADS, FF, dropout=0.0, activation=F.silu, bias=False,
                                       batch_first=True, norm_first=True)
    src = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).double().eval()
    co = cs.continual(src, temporal_window=N)
    x = torch.randn(2, D, 10, dtype=torch.float64)
    torch.testing.assert_close(stepped(co, x), sliding(src, x, N, -1, True), rtol=1e-9,
                               atol=1e-9)


@pytest.mark.parametrize("layers", [1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_encoder_meets_streaming_contract(layers, dtype):
    src = torch_encoder(layers, norm_first=layers == 2, dtype=dtype, seed=layers)
    co = cs.continual(src, temporal_window=N)
    x = torch.randn(3, D, 11, dtype=dtype)
    assert_streaming_equivalent(co, x, lambda v: sliding(src, v, N, -1, True))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(("retroactive", "recompute"), [(False, False), (True, False),
                                                         (True, True)])
def test_encoder_layer_meets_streaming_contract(dtype, retroactive, recompute):
    torch.manual_seed(0)
    src = nn.TransformerEncoderLayer(D, HEADS, FF, dropout=0.0, batch_first=True).to(dtype).eval()
    co = cs.TransformerEncoderLayer.from_torch(src, N, retroactive=retroactive,
                                               recompute=recompute)
    x = torch.randn(3, D, 10, dtype=dtype)
    with torch.no_grad():
        windows = x.unfold(2, N, 1).permute(0, 2, 3, 1)  # (B, T', n, d)
        full = src(windows.reshape(-1, N, D)).reshape(*windows.shape)
    ref = full.permute(0, 3, 1, 2) if retroactive else full[:, :, -1].transpose(1, 2)
    assert_streaming_equivalent(co, x, ref)
    if retroactive:
        y = co.forward_steps(x[:, :, :N])
        assert y.shape == (3, D, 1, N)
        co.reset_state()


def test_exact_and_running_encoders_warm_up_in_a_pipeline():
    """Inside a Sequential the encoder sees filler frames while the conv warms up."""
    src = torch_encoder(3)
    enc = cs.TransformerEncoder.from_torch(src, N, recompute=True)
    torch.manual_seed(1)
    conv = cs.Conv1d(D, D, 3).double()
    pe = cs.RecyclingPositionalEncoding(D, 7, learned=False).double()
    net = cs.Sequential(conv, pe, enc)
    assert net.delay == 2 + N - 1
    x = torch.randn(3, D, 14, dtype=torch.float64)
    assert_streaming_equivalent(net, x, lambda v: sliding(src, pe(conv(v)), N, -1, True))
    running = cs.Sequential(conv, pe, cs.TransformerEncoder.from_torch(src, N, recompute=False))
    assert_streaming_equivalent(running, x, lambda v: sliding(src, pe(conv(v)), N, -1, True))


def test_parameters_are_shared_and_named_like_torch():
    src = torch_encoder(2, final_norm=True)
    co = cs.continual(src, temporal_window=N)
    names = [n for n, _ in src.named_parameters()]
    assert names == [n for n, _ in co.named_parameters()]
    assert all(p is q for p, q in zip(src.parameters(), co.parameters(), strict=True))
    other = torch_encoder(2, final_norm=True, seed=7)
    assert str(co.load_state_dict(other.state_dict())) == "<All keys matched successfully>"
    fresh = cs.TransformerEncoder(nn.TransformerEncoderLayer(D, HEADS, FF, dropout=0.0), 2,
                                  nn.LayerNorm(D), window=N).double()
    fresh.load_state_dict(other.state_dict())
    x = torch.randn(1, D, 8, dtype=torch.float64)
    torch.testing.assert_close(fresh(x), sliding(other, x, N, -1, True), rtol=1e-9, atol=1e-9)


def test_conversion_needs_window_and_stepping_needs_eval():
    src = torch_encoder(1)
    with pytest.raises(TypeError, match="temporal_window"):
        cs.continual(src)
    with pytest.raises(TypeError, match="temporal_window"):
        cs.continual(src.layers[0])
    layer = nn.TransformerEncoderLayer(D, HEADS, FF, dropout=0.1).double()
    co = cs.continual(layer, temporal_window=N)
    assert co.training
    co(torch.randn(1, D, 6, dtype=torch.float64))  # offline training forward is torch's
    with pytest.raises(RuntimeError, match="dropout in training mode"):
        co.forward_step(torch.randn(1, D, dtype=torch.float64))
    co.eval()
    assert co.forward_step(torch.randn(1, D, dtype=torch.float64)) is None


def test_invalid_window_and_query_index():
    layer = nn.TransformerEncoderLayer(D, HEADS, FF)
    with pytest.raises(ValueError, match="window"):
        cs.TransformerEncoderLayer.from_torch(layer, 0)
    with pytest.raises(ValueError, match="query_index"):
        cs.TransformerEncoder(layer, 2, window=4, query_index=4)
    with pytest.raises(ValueError, match="num_layers"):
        cs.TransformerEncoder(layer, 0, window=4)
