"""Continual multi-head attention: single-output and retroactive forms."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

import costream as cs
from costream.testing import assert_streaming_equivalent

D, HEADS, N = 12, 3, 4


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread


def torch_mha(dtype: torch.dtype = torch.float64, batch_first: bool = False,
              scale: float = 1.0, seed: int = 0) -> nn.MultiheadAttention:
    torch.manual_seed(seed)
    mha = nn.MultiheadAttention(D, HEADS, batch_first=batch_first)
    with torch.no_grad():
        nn.init.uniform_(mha.in_proj_bias, -0.5, 0.5)
        mha.in_proj_weight.mul_(scale)
    return mha.to(dtype).eval()


def windows_attention(mha: nn.MultiheadAttention, x: Tensor, n: int) -> Tensor:
    """torch's attention over every window of ``n`` tokens: ``(B, d, T - n + 1, n)``."""
    outs = []
    with torch.no_grad():
        for s in range(x.shape[2] - n + 1):
            w = x[:, :, s:s + n].permute(2, 0, 1)  # (n, B, d)
            if mha.batch_first:
                w = w.transpose(0, 1)
            y = mha(w, w, w, need_weights=False)[0]
            outs.append(y if mha.batch_first else y.transpose(0, 1))  # (B, n, d)
    return torch.stack(outs, 2).permute(0, 3, 2, 1)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("query_index", [-1, 0, 2])
@pytest.mark.parametrize("n", [1, N])
def test_single_output(dtype, query_index, n):
    if query_index >= n:
        query_index = -1
    mha = torch_mha(dtype, batch_first=query_index == 0)
    co = cs.SingleOutputMultiheadAttention.from_torch(mha, n, query_index=query_index)
    x = torch.randn(3, D, 9, dtype=dtype)
    ref = windows_attention(mha, x, n)[..., query_index]
    assert_streaming_equivalent(co, x, ref)
    if dtype == torch.float64:
        y = torch.stack([co.forward_step(x[:, :, t]) for t in range(9)][n - 1:], 2)
        torch.testing.assert_close(y, ref, rtol=1e-9, atol=1e-9)
        co.reset_state()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("n", [1, N])
def test_retroactive(dtype, recompute, n):
    mha = torch_mha(dtype, batch_first=recompute)
    co = cs.RetroactiveMultiheadAttention.from_torch(mha, n, recompute=recompute)
    x = torch.randn(3, D, 10, dtype=dtype)
    assert_streaming_equivalent(co, x, windows_attention(mha, x, n))


def test_retroactive_long_stream_does_not_drift():
    mha = torch_mha(scale=2.0)
    co = cs.RetroactiveMultiheadAttention.from_torch(mha, 8)
    x = torch.randn(2, D, 400, dtype=torch.float64)
    with torch.no_grad():
        y = torch.stack([co.forward_step(x[:, :, t]) for t in range(400)][7:], 2)
    torch.testing.assert_close(y, co(x), rtol=1e-9, atol=1e-9)


def test_recompute_is_exact_for_peaked_attention():
    """Scores far apart: running sums lose the small terms, recomputation does not."""
    mha = torch_mha(scale=6.0)
    co = cs.RetroactiveMultiheadAttention.from_torch(mha, N, recompute=True)
    x = torch.randn(2, D, 60, dtype=torch.float64)
    with torch.no_grad():
        y = torch.stack([co.forward_step(x[:, :, t]) for t in range(60)][N - 1:], 2)
    torch.testing.assert_close(y, windows_attention(mha, x, N), rtol=1e-9, atol=1e-9)


def test_step_macs_follow_the_paper():
    """Matrix-product MACs per step and head: single-output 2 n d_h (the paper: 2 n d_h + 2 d_h
    with the softmax); retroactive with running sums 4 n d_h - 2 d_h, plus 4 n d_h - 3 d_h
    element-wise products of the update (the paper counts 7 n d_h + 2 n - 3 d_h in all);
    retroactive recomputed over the window (the default) 2 n^2 d_h."""
    d, h, n = 64, 4, 16
    dh = d // h
    proj = 3 * d * d + d * d  # new token's q, k, v and one output projection
    single = cs.SingleOutputMultiheadAttention(d, h, window=n).eval()
    retro = cs.RetroactiveMultiheadAttention(d, h, window=n, recompute=False).eval()
    exact = cs.RetroactiveMultiheadAttention(d, h, window=n).eval()
    frame = torch.randn(1, d)

    def sdpa(q, k, v, *args, out_shape=None, **kwargs):  # CPU attention is not in torch's table
        return sdpa_flop_count(q, k, v)

    def macs(m: cs.CoModule) -> int:
        mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: sdpa}
        with torch.no_grad():
            for _ in range(n + 1):
                m.forward_step(frame)
            with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
                m.forward_step(frame)
        m.reset_state()
        return counter.get_total_flops() // 2

    assert macs(single) == proj + h * 2 * n * dh
    assert macs(retro) == 3 * d * d + n * d * d + h * (4 * n * dh - 2 * dh)
    assert macs(exact) == 3 * d * d + n * d * d + h * 2 * n * n * dh


def test_conversion_sharing_and_errors():
    mha = torch_mha()
    co = cs.continual(mha, temporal_window=N)
    assert isinstance(co, cs.SingleOutputMultiheadAttention)
    assert [n for n, _ in co.named_parameters()] == [n for n, _ in mha.named_parameters()]
    assert all(p is q for p, q in zip(mha.parameters(), co.parameters(), strict=True))
    with pytest.raises(TypeError, match="temporal_window"):
        cs.continual(mha)
    with pytest.raises(ValueError, match="add_bias_kv"):
        cs.SingleOutputMultiheadAttention.from_torch(nn.MultiheadAttention(D, HEADS,
                                                                           add_bias_kv=True), N)
    with pytest.raises(ValueError, match="query_index"):
        cs.SingleOutputMultiheadAttention(D, HEADS, window=N, query_index=-N - 1)
    train = cs.RetroactiveMultiheadAttention(D, HEADS, dropout=0.2, window=N)
    with pytest.raises(RuntimeError, match="dropout in training mode"):
        train.forward_step(torch.randn(1, D))
    with pytest.raises(ValueError, match="expects 12 input channels"):
        co.forward_step(torch.randn(1, D + 1, dtype=torch.float64))
    assert co(torch.randn(2, D, N - 1, dtype=torch.float64)).shape == (2, D, 0)
