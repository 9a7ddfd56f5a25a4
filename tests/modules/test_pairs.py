"""Paired steps of temporal 3D convs: two outputs from k + 1 frame convolutions (F(2, k))."""

from __future__ import annotations

import contextlib
import copy
from fractions import Fraction

import pytest
import torch
from torch import nn

import costream as cs
from costream.bench import step_macs
from costream.modules import _conv, _onednn
from costream.modules._pairs import PAIRED_KERNELS, combine, pair_transforms, pairs_pay
from costream.testing import assert_streaming_equivalent


@pytest.fixture
def pairs_everywhere(monkeypatch):
    """Float32 CPU inference pairs every paired conv, however narrow (the speed rule aside)."""
    monkeypatch.setattr(_conv, "pairs_pay", lambda *args: True)


def _step_all(net, x):
    with torch.inference_mode():
        net.reset_state()
        ys = [net.forward_step(x[:, :, t]) for t in range(x.shape[2])]
    return torch.stack([y for y in ys if y is not None], 2)


@pytest.mark.parametrize("k", PAIRED_KERNELS)
def test_the_transforms_give_both_outputs_of_a_pair_exactly(k) -> None:
    tr = pair_transforms(k)
    gen = torch.Generator().manual_seed(k)
    g = [Fraction(int(v)) for v in torch.randint(-9, 10, (k,), generator=gen)]
    d = [Fraction(int(v)) for v in torch.randint(-9, 10, (k + 1,), generator=gen)]
    # exact arithmetic: the coefficients are small fractions
    kernels = [sum(Fraction(c).limit_denominator(1000) * gj for c, gj in zip(row, g))
               for row in tr.kernels]
    inputs = [sum(Fraction(c) * d[i] for i, c in terms) for terms in tr.inputs]
    products = [u * v for u, v in zip(kernels, inputs)]
    first = sum(products)
    carry = sum(Fraction(c) * products[i] for i, c in tr.carry)
    second = carry + g[-1] * sum(Fraction(c) * d[1 + i] for i, c in tr.last)
    assert first == sum(gj * dj for gj, dj in zip(g, d[:k]))
    assert second == sum(gj * dj for gj, dj in zip(g, d[1:]))
    # the finite products read only the pair's first k frames; the last product's new frame
    # enters as is
    assert all(i < k for terms in tr.inputs for i, _ in terms)
    assert (k - 1, 1.0) in tr.last


def test_combine_writes_into_a_given_tensor() -> None:
    parts = [torch.full((2,), float(v)) for v in (1, 2, 3)]
    out = torch.empty(2)
    assert combine(((2, 1.0), (0, -2.0), (1, 0.5)), parts, out) is out
    assert out.tolist() == [2.0, 2.0]
    assert combine(((1, 3.0),), parts).tolist() == [6.0, 6.0]


@pytest.mark.parametrize("geometry", [
    {"kernel_size": 3, "padding": 1},
    {"kernel_size": (3, 3, 3), "padding": (2, 1, 1)},
    {"kernel_size": (3, 3, 3), "padding": (0, 1, 1), "bias": False},
    {"kernel_size": (4, 3, 1), "padding": (2, 1, 0), "stride": (1, 2, 1)},
    {"kernel_size": (5, 3, 3), "padding": (2, 0, 0), "groups": 2},
    {"kernel_size": (5, 1, 1), "padding": (4, 0, 0)},
], ids=["k3", "k3-causal", "k3-no-padding", "k4-strided", "k5-groups", "k5-pointwise"])
def test_paired_convs_equal_the_offline_conv_in_float64(geometry) -> None:
    torch.manual_seed(0)
    src = nn.Conv3d(4, 6, **geometry).double().eval()
    co = cs.continual(src)
    assert co._paired
    x = torch.randn(2, 4, 12, 9, 8, dtype=torch.float64)
    assert_streaming_equivalent(co, x, src)  # steps, chunks, flush, streams, save/restore
    # the steps did open and close pairs: the carry is due after every other step
    co.reset_state()
    due = []
    for t in range(6):
        co.forward_step(x[:, :, t])
        due.append(co.get_state()["tree"]["due"].tolist())
    assert due == [[1.0, 1.0], [0.0, 0.0]] * 3


@pytest.mark.filterwarnings("ignore:parameters created under")  # the contract's module copies
@pytest.mark.parametrize("act", [nn.ReLU(), nn.SiLU(), nn.Hardswish(), None])
@pytest.mark.parametrize("bn", [True, False])
def test_paired_convs_with_their_epilogue_equal_the_offline_net_in_float32(
        pairs_everywhere, act, bn) -> None:
    torch.manual_seed(0)
    layers = [nn.Conv3d(3, 8, 3, padding=1)]
    if bn:
        norm = nn.BatchNorm3d(8)
        norm.running_mean.uniform_(-1, 1)
        norm.running_var.uniform_(0.5, 2)
        layers.append(norm)
    if act is not None:
        layers.append(act)
    layers.append(nn.Conv3d(8, 5, (5, 3, 3), stride=(1, 2, 2), padding=(2, 1, 1)))
    src = nn.Sequential(*layers).eval()
    net = cs.continual(copy.deepcopy(src)).eval()
    x = torch.randn(2, 3, 11, 10, 9)
    with torch.no_grad():
        ref = src(x)
    got = _step_all(net, x)
    torch.testing.assert_close(got, ref[:, :, :got.shape[2]], rtol=1e-4, atol=1e-5)
    with torch.inference_mode():
        assert_streaming_equivalent(net, x, src)


def test_float32_pairs_run_one_grouped_conv_then_one_conv_with_the_carry(
        pairs_everywhere, monkeypatch) -> None:
    if _onednn.ONEDNN_CONV is None or _onednn.ONEDNN_CONV_ADD is None:
        pytest.skip("this torch has no oneDNN convolution with packed kernels")
    calls = []

    def spy(name, real):
        def call(*args):
            calls.append((name, tuple(args[0].shape), args[2 if name == "add" else 1].is_mkldnn))
            return real(*args)
        return call

    monkeypatch.setattr(_onednn, "ONEDNN_CONV", spy("conv", _onednn.ONEDNN_CONV))
    monkeypatch.setattr(_onednn, "ONEDNN_CONV_ADD", spy("add", _onednn.ONEDNN_CONV_ADD))
    torch.manual_seed(0)
    net = cs.continual(nn.Sequential(nn.Conv3d(4, 8, 3, padding=1), nn.ReLU())).eval()
    x = torch.randn(1, 4, 8, 6, 6)
    with torch.no_grad():
        ref = net(x)
    got = _step_all(net, x)
    torch.testing.assert_close(got, ref[:, :, :got.shape[2]], rtol=1e-4, atol=1e-5)
    # a pair's first step: the 3 frame combinations (12 channels) in one grouped conv; its
    # second: one conv of 4 channels with the carry added; kernels packed once
    assert calls == [("conv", (1, 12, 6, 6), True), ("add", (1, 4, 6, 6), True)] * 4
    assert len(net[0]._packed.packs) == 2


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_two_paired_steps_execute_k_plus_one_frame_convolutions(pairs_everywhere, dtype) -> None:
    """float64 runs F.conv2d, float32 oneDNN's convolutions (the last with the carry added):
    both are counted."""
    conv = cs.Conv3d(16, 16, 3, padding=1).to(dtype)
    frame = torch.randn(1, 16, 6, 6, dtype=dtype)
    per_conv = 16 * 16 * 9 * 36  # one frame convolution: C_out x C_in x 3 x 3 x pixels
    assert step_macs(conv, frame, steps=2) == 4 * per_conv  # 3 + 1, not 2 x 3
    assert step_macs(conv, frame, steps=4) == 8 * per_conv


def test_streams_out_of_step_take_one_direct_step_and_pair_again() -> None:
    """An engine's block mixes streams whose pairs disagree; the direct step in between
    leaves every stream's outputs exact, and the next steps pair again."""
    torch.manual_seed(0)
    src = nn.Conv3d(4, 6, 3, padding=1).double().eval()
    co = cs.continual(copy.deepcopy(src))
    x = torch.randn(2, 4, 10, 7, 7, dtype=torch.float64)
    ys, dues = [], []
    for t in range(10):
        if t == 3:  # stream 1 starts again mid-pair: its pair is closed, stream 0's open
            co.reset_state(torch.tensor([False, True]))
        y = co.forward_step(x[:, :, t] if t < 3 else torch.stack(
            (x[0, :, t], x[1, :, t - 3])))
        ys.append(y)
        dues.append(co.get_state()["tree"]["due"].tolist())
    # direct steps (no pair open) while the streams are out of step and the new one warms
    # up, then pairs in step again
    assert dues[3] == [0.0, 0.0]
    assert dues[-4:] in ([[1.0, 1.0], [0.0, 0.0]] * 2, [[0.0, 0.0], [1.0, 1.0]] * 2)
    with torch.no_grad():
        ref0 = src(x[:1])
        ref1 = src(x[1:, :, :7])
    got0 = torch.stack([y[0] for y in ys[1:]], 1)  # delay 1 (padding 1 of 3 taps)
    torch.testing.assert_close(got0, ref0[0, :, :9], rtol=1e-12, atol=1e-12)
    got1 = torch.stack([y[1] for y in ys[4:]], 1)
    torch.testing.assert_close(got1, ref1[0, :, :6], rtol=1e-12, atol=1e-12)


def test_a_stream_saved_mid_pair_resumes_bit_for_bit(pairs_everywhere) -> None:
    torch.manual_seed(0)
    net = cs.continual(nn.Sequential(nn.Conv3d(4, 8, 3, padding=1), nn.ReLU())).eval()
    twin = copy.deepcopy(net)
    x = torch.randn(1, 4, 9, 6, 6)
    with torch.inference_mode():
        for t in range(3):
            net.forward_step(x[:, :, t])
        saved = net.get_state()
        assert saved["tree"][0]["due"].item() == 1.0  # a pair is open
        rest = [net.forward_step(x[:, :, t]) for t in range(3, 9)]
        twin.set_state(saved)
        again = [twin.forward_step(x[:, :, t]) for t in range(3, 9)]
    for a, b in zip(rest, again):
        assert torch.equal(a, b)


def _assert_exact_with_a_refilled_frame(src: nn.Module) -> None:
    """Step ``src``'s conversion through one caller tensor refilled in place at every step."""
    net = cs.continual(copy.deepcopy(src)).eval()
    x = torch.randn(1, 4, 7, 6, 6)
    buf = torch.empty(1, 4, 6, 6).contiguous(memory_format=torch.channels_last)
    outs = []
    with torch.inference_mode():
        for t in range(7):
            buf.copy_(x[:, :, t])  # the caller's one frame tensor, refilled in place
            outs.append(net.forward_step(buf))
        ref = src(x.clone())
    got = torch.stack([y for y in outs if y is not None], 2)
    torch.testing.assert_close(got, ref[:, :, :got.shape[2]], rtol=1e-4, atol=1e-5)


def test_the_state_keeps_its_own_copy_of_a_frame_the_caller_refills(pairs_everywhere) -> None:
    torch.manual_seed(0)
    _assert_exact_with_a_refilled_frame(nn.Conv3d(4, 8, 3, padding=1).eval())


def test_a_weight_changed_mid_stream_reaches_both_steps_of_a_pair(pairs_everywhere) -> None:
    torch.manual_seed(0)
    net = cs.continual(nn.Sequential(nn.Conv3d(4, 8, 3, padding=1))).eval()
    x = torch.randn(1, 4, 8, 6, 6)
    _step_all(net, x)  # kernels derived and packed
    with torch.no_grad():
        net[0].weight.mul_(-0.5)
        net[0].bias.add_(1.0)
        ref = net(x)
    got = _step_all(net, x)
    torch.testing.assert_close(got, ref[:, :, :got.shape[2]], rtol=1e-4, atol=1e-5)


def test_pairs_pay_only_where_they_were_measured_to() -> None:
    assert not pairs_pay(2, 64, 64, 1)  # two taps: too little saved
    assert not pairs_pay(3, 3, 24, 1)  # an RGB stem
    assert pairs_pay(3, 24, 32, 1) and pairs_pay(5, 24, 32, 2)
    assert not pairs_pay(3, 48, 64, 2) and pairs_pay(3, 48, 96, 2)
    assert not pairs_pay(7, 64, 64, 1)  # no transforms past 5 taps


@pytest.mark.parametrize("norm", [False, True], ids=["plain", "eval-batch-norm"])
def test_gradients_flow_through_paired_steps(norm) -> None:
    torch.manual_seed(0)
    layers = [nn.Conv3d(3, 4, 3, padding=1)]
    if norm:  # an epilogue: the norm's multiply-add on the paired conv's output
        layers.append(nn.BatchNorm3d(4))
    src = nn.Sequential(*layers, nn.ReLU(),
                        nn.Conv3d(4, 2, (5, 3, 3), padding=(2, 1, 1))).double()
    if norm:
        src[1].eval()
        src[1].running_mean.uniform_(-0.5, 0.5)
        src[1].running_var.uniform_(0.5, 2.0)
    net = cs.continual(copy.deepcopy(src))
    x = torch.randn(1, 3, 9, 6, 6, dtype=torch.float64)
    ys = [y for y in (net.forward_step(x[:, :, t]) for t in range(9)) if y is not None]
    sum(y.square().sum() for y in ys).backward()
    src(x)[:, :, :len(ys)].square().sum().backward()
    for a, b in zip(net.parameters(), src.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-12)


def test_a_paired_net_steps_under_no_grad_after_inference_mode(pairs_everywhere) -> None:
    # the frame combinations' scratch made under inference mode takes no writes outside it
    torch.manual_seed(0)
    src = nn.Sequential(nn.Conv3d(16, 16, 3, padding=1), nn.ReLU()).eval()
    net = cs.continual(copy.deepcopy(src)).eval()
    x = torch.randn(1, 16, 8, 6, 6)
    ys = []
    with torch.inference_mode():
        ys += [net.forward_step(x[:, :, t]) for t in range(4)]
    with torch.no_grad():
        ys += [net.forward_step(x[:, :, t]) for t in range(4, 8)]
        ref = src(x)
    torch.testing.assert_close(torch.stack(ys[1:], 2), ref[:, :, :7], rtol=1e-5, atol=1e-5)


def _normed(c_in: int = 4, c: int = 8, act: nn.Module | None = None) -> nn.Sequential:
    norm = nn.BatchNorm3d(c)
    norm.running_mean.uniform_(-1, 1)
    norm.running_var.uniform_(0.5, 2)
    norm.weight.data.uniform_(0.5, 1.5)
    return nn.Sequential(nn.Conv3d(c_in, c, 3, padding=1), norm,
                         *([act] if act is not None else [])).eval()


@pytest.mark.filterwarnings("ignore:parameters created under")
@pytest.mark.parametrize("act", [nn.ReLU(), nn.SiLU(), None], ids=["relu", "silu", "none"])
def test_float32_pairs_fold_the_batch_norm_into_their_kernels(pairs_everywhere, act) -> None:
    """A fused float32 paired step runs no multiply-add for its norm (folded into the pair
    kernels, the carry in the norm's scale) and still equals the offline net."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.names: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func))
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    src = _normed(act=act)
    net = cs.continual(copy.deepcopy(src)).eval()
    x = torch.randn(2, 4, 9, 6, 6)
    with torch.inference_mode():
        ref = src(x)
        ys = [net.forward_step(x[:, :, t]) for t in range(5)]
        with Ops() as ops:  # steps 5 and 6: a pair
            ys += [net.forward_step(x[:, :, t]) for t in range(5, 7)]
        assert net.get_state()["tree"][0]["due"].tolist() in ([0.0, 0.0], [2.0, 2.0])
        ys += [net.forward_step(x[:, :, t]) for t in range(7, 9)]
    assert not [n for n in ops.names if "addcmul" in n or "batch_norm" in n]
    torch.testing.assert_close(torch.stack(ys[1:], 2), ref[:, :, :8], rtol=1e-4, atol=1e-5)


@pytest.mark.filterwarnings("ignore:parameters created under")
def test_a_carry_in_the_norms_scale_meets_an_unfused_step(pairs_everywhere) -> None:
    """Fused steps hold a pair's carry in the folded norm's scale, unfused steps as the conv
    computes it: a step of the other kind than the open pair takes the direct step, and the
    outputs stay the offline net's whichever steps alternate."""
    from costream.modules import _fusion

    torch.manual_seed(1)
    src = _normed(act=nn.ReLU())
    net = cs.continual(copy.deepcopy(src)).eval()
    x = torch.randn(1, 4, 12, 6, 6)
    ys, dues = [], []
    with torch.inference_mode():
        ref = src(x)
        for t in range(12):
            with _fusion.unfused() if t in (3, 4, 8) else contextlib.nullcontext():
                ys.append(net.forward_step(x[:, :, t]))
            dues.append(net.get_state()["tree"][0]["due"].item())
    assert 2.0 in dues and 1.0 in dues  # pairs opened by both kinds of step
    torch.testing.assert_close(torch.stack(ys[1:], 2), ref[:, :, :11], rtol=1e-4, atol=1e-5)


def _clones(net, frames) -> list[int]:
    """The number of tensor copies (aten.clone) of each step."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Clones(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten.clone.default:
                Clones.n += 1
            return func(*args, **(kwargs or {}))

    counts = []
    for f in frames:
        Clones.n = 0
        with Clones():
            net.forward_step(f)
        counts.append(Clones.n)
    return counts


def test_a_sequential_hands_its_intermediates_to_paired_convs_without_a_copy(
        pairs_everywhere) -> None:
    """Only the caller's frame is copied into a state; the frames the first conv hands on
    are kept as they are, and the outputs stay the offline net's."""
    torch.manual_seed(0)
    src = nn.Sequential(nn.Conv3d(4, 8, 3, padding=1), nn.ReLU(),
                        nn.Conv3d(8, 8, 3, padding=1), nn.Conv3d(8, 6, 3, padding=1)).eval()
    net = cs.continual(copy.deepcopy(src)).eval()
    x = torch.randn(1, 4, 9, 6, 6)
    frames = [x[:, :, t].contiguous(memory_format=torch.channels_last) for t in range(9)]
    with torch.inference_mode():
        counts = _clones(net, frames[:4])
        ys = [net.forward_step(f) for f in frames[4:]]
        ref = src(x)
    assert counts == [1] * 4  # the first conv's copy of the caller's frame, nothing more
    torch.testing.assert_close(torch.stack(ys, 2), ref[:, :, 1:6], rtol=1e-4, atol=1e-5)


def test_a_frame_an_in_place_module_passes_on_is_still_the_callers(pairs_everywhere) -> None:
    """An in-place activation before a paired conv hands it the caller's own tensor: the
    conv copies it, so a caller refilling its frame tensor changes no state."""
    torch.manual_seed(0)
    _assert_exact_with_a_refilled_frame(
        nn.Sequential(nn.ReLU(inplace=True), nn.Conv3d(4, 8, 3, padding=1)).eval())
