"""Continual RNN, LSTM and GRU: the hidden state is the stream state."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import costream as cs
from costream.testing import assert_streaming_equivalent

KINDS = [(nn.RNN, cs.RNN, {"nonlinearity": "relu"}), (nn.RNN, cs.RNN, {}),
         (nn.LSTM, cs.LSTM, {}), (nn.LSTM, cs.LSTM, {"proj_size": 3}), (nn.GRU, cs.GRU, {})]
IDS = ["rnn_relu", "rnn_tanh", "lstm", "lstm_proj", "gru"]


pytestmark = [
    pytest.mark.usefixtures("one_thread"),  # tiny tensors: one thread
    # torch: "LSTM with projections is not supported with oneDNN"
    pytest.mark.filterwarnings("ignore:.*not supported with oneDNN"),
]


def seq_of(x: Tensor, batch_first: bool) -> Tensor:
    return x.permute(0, 2, 1) if batch_first else x.permute(2, 0, 1)


def clip_of(y: Tensor, batch_first: bool) -> Tensor:
    return y.permute(0, 2, 1) if batch_first else y.permute(1, 2, 0)


@pytest.mark.parametrize(("torch_cls", "co_cls", "kw"), KINDS, ids=IDS)
@pytest.mark.parametrize("batch_first", [False, True])
def test_stepping_equals_torch_bit_for_bit(torch_cls, co_cls, kw, batch_first):
    torch.manual_seed(0)
    src = torch_cls(4, 6, num_layers=3, batch_first=batch_first, **kw).double().eval()
    co = cs.continual(src)
    assert isinstance(co, co_cls)
    x = torch.randn(3, 4, 17, dtype=torch.float64)
    with torch.no_grad():
        whole = clip_of(src(seq_of(x, batch_first))[0], batch_first)
        # the torch module fed one frame at a time, hidden state carried over
        hx, frames = None, []
        for t in range(x.shape[2]):
            y, hx = src(seq_of(x[:, :, t:t + 1], batch_first), hx)
            frames.append(clip_of(y, batch_first)[:, :, 0])
        by_frame = torch.stack(frames, 2)
        stepped = torch.stack([co.forward_step(x[:, :, t]) for t in range(x.shape[2])], 2)
        co.reset_state()
        chunked = torch.cat([co.forward_steps(x[:, :, :7]), co.forward_steps(x[:, :, 7:])], 2)
        co.reset_state()
    assert torch.equal(co.forward_steps(x), whole)  # a chunk is one torch call
    co.reset_state()
    assert torch.equal(stepped, by_frame)
    assert torch.equal(chunked[:, :, 7:], clip_of(
        src(seq_of(x[:, :, 7:], batch_first), _torch_hx(co, src, x[:, :, :7]))[0], batch_first))
    # torch's whole-sequence kernel projects all inputs in one matrix product, whose rounding
    # depends on its row count: stepping agrees with it to rounding
    torch.testing.assert_close(stepped, whole, rtol=0, atol=1e-14)
    torch.testing.assert_close(co(x), whole, rtol=0, atol=0)


def _torch_hx(co: cs.CoModule, src: nn.RNNBase, head: Tensor):
    """torch's hidden state after ``head``, from costream's state layout."""
    co.reset_state()
    with torch.no_grad():
        co.forward_steps(head)
    tree = co.get_state()["tree"]
    co.reset_state()
    h = tree["h"].transpose(0, 1).contiguous()
    return (h, tree["c"].transpose(0, 1).contiguous()) if "c" in tree else h


@pytest.mark.parametrize(("torch_cls", "co_cls", "kw"), KINDS, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_streaming_contract(torch_cls, co_cls, kw, dtype):
    torch.manual_seed(1)
    src = torch_cls(4, 5, num_layers=2, **kw).to(dtype).eval()
    co = co_cls.from_torch(src)
    x = torch.randn(3, 4, 11, dtype=dtype)
    assert_streaming_equivalent(co, x, lambda v: clip_of(src(seq_of(v, False))[0], False))
    state = co.init_state(3)
    assert state["tree"]["h"].shape == (3, 2, kw.get("proj_size", 5))  # batch first


@pytest.mark.parametrize("co_cls", [cs.RNN, cs.LSTM, cs.GRU])
def test_filler_frames_keep_the_initial_hidden_state(co_cls):
    """Behind a conv, restarted streams see filler frames; their hidden state must wait."""
    torch.manual_seed(2)
    conv, rnn = nn.Conv1d(4, 4, 3).double(), getattr(nn, co_cls.__name__)(4, 5).double()
    net = cs.Sequential(cs.continual(conv), cs.continual(rnn))
    x = torch.randn(3, 4, 12, dtype=torch.float64)
    assert_streaming_equivalent(net, x, lambda v: clip_of(rnn(seq_of(conv(v), False))[0], False))
    state = net.init_state(2)
    state["age"] = torch.tensor([5, -1])
    frame = torch.randn(2, 4, dtype=torch.float64)
    _, new = net.step(frame, state)
    assert torch.equal(new["tree"][1]["h"][1], state["tree"][1]["h"][1])
    assert not torch.equal(new["tree"][1]["h"][0], state["tree"][1]["h"][0])


def test_bidirectional_is_rejected():
    for torch_cls, co_cls in ((nn.RNN, cs.RNN), (nn.LSTM, cs.LSTM), (nn.GRU, cs.GRU)):
        with pytest.raises(ValueError, match="cannot be bidirectional"):
            co_cls(3, 4, bidirectional=True)
        with pytest.raises(ValueError, match="frames that have not arrived"):
            cs.continual(nn.Sequential(torch_cls(3, 4, bidirectional=True)))


def test_parameters_shared_and_training_dropout():
    src = nn.LSTM(3, 4, num_layers=2, dropout=0.5)
    co = cs.continual(src)
    assert [n for n, _ in co.named_parameters()] == [n for n, _ in src.named_parameters()]
    assert all(p is q for p, q in zip(src.parameters(), co.parameters(), strict=True))
    assert str(co.load_state_dict(nn.LSTM(3, 4, num_layers=2).state_dict())) == \
        "<All keys matched successfully>"
    with pytest.raises(RuntimeError, match="dropout in training mode"):
        co.forward_step(torch.randn(1, 3))
    co.eval()
    assert co.forward_step(torch.randn(1, 3)).shape == (1, 4)
    assert co.receptive_field == 1 and co.delay == 0
