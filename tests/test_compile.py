"""The pure step compiles with ``torch.compile(fullgraph=True)`` and matches eager stepping."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator

import pytest
import torch
from torch import nn

import costream as cs
from costream.core import tree_leaves, tree_map, tree_where
from costream.runtime import compile_step
from models._inputs import offline_zoo_models, small_zoo_model, streamable_zoo_layer_sets

D = torch.float64
LIMIT_S = 240


@contextlib.contextmanager
def time_limit(seconds: int) -> Iterator[None]:
    """Fail (not hang) if the block runs longer than ``seconds``."""

    def expire(signum, frame):
        raise TimeoutError(f"compilation took longer than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _net() -> cs.Sequential:
    return cs.Sequential(
        cs.Conv1d(3, 4, 3, padding=1), nn.ReLU(),
        cs.MaxPool1d(2, stride=1),
        cs.Residual(cs.Conv1d(4, 4, 3)),
        cs.AvgPool1d(2, stride=1),
        cs.Conv1d(4, 2, 1),
    ).to(D)


@pytest.mark.slow
def test_compiled_step_matches_eager() -> None:
    net = _net()
    steps = 10
    x = torch.randn(2, 3, steps, dtype=D)
    torch._dynamo.reset()
    compiled = torch.compile(net.step, fullgraph=True)
    eager_state = net.init_state(2, (3,))
    state = net.init_state(2, (3,))
    offline = net(x)
    due = 0
    with torch.no_grad(), time_limit(LIMIT_S):
        for t in range(steps):
            y_eager, eager_state = net.step(x[:, :, t], eager_state)
            y, state = compiled(x[:, :, t], state)
            assert torch.equal(state["age"], eager_state["age"])
            ready = net.ready(state)
            assert torch.equal(ready, net.ready(eager_state))
            if not bool(ready.all()):
                continue
            torch.testing.assert_close(y, y_eager, rtol=1e-10, atol=1e-10)
            torch.testing.assert_close(y, offline[:, :, due], rtol=1e-10, atol=1e-10)
            due += 1
    assert due == steps - net.delay

    # restart stream 0 in the explicit state: the streams are now at different ages
    mask = torch.tensor([True, False])
    fresh = net.init_state(2, (3,))
    state = {"tree": tree_where(mask, fresh["tree"], state["tree"]),
             "age": torch.where(mask, fresh["age"], state["age"]), "phase": 0}
    eager_state = {**state, "tree": tree_map(torch.clone, state["tree"])}
    solo_state = net.init_state(1, (3,))
    compared = 0
    with torch.no_grad(), time_limit(LIMIT_S):
        for t in range(steps):
            y_eager, eager_state = net.step(x[:, :, t], eager_state)
            y, state = compiled(x[:, :, t], state)
            y_solo, solo_state = net.step(x[:1, :, t], solo_state)
            ready = net.ready(state)
            assert ready.tolist() == [t >= net.delay, True]
            torch.testing.assert_close(y[1], y_eager[1], rtol=1e-10, atol=1e-10)
            if bool(ready[0]):
                torch.testing.assert_close(y[:1], y_solo, rtol=1e-10, atol=1e-10)
                compared += 1
    assert compared == steps - net.delay
    torch._dynamo.reset()


# ---------------------------------------------------------------------- compile_step
@pytest.fixture
def one_thread() -> Iterator[None]:
    """Compilation is Python-bound and the steps are tiny: a second thread only contends."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    torch._dynamo.reset()


def _matches_eager(net: cs.CoModule, frame_shape: tuple[int, ...], step, dtype: torch.dtype,
                   tol: float, batch: int = 2) -> int:
    """Run ``step`` and eager ``step_stride`` side by side past the warm-up; compare outputs
    and states. After the first call nothing may recompile. Returns the outputs compared."""
    s = net.temporal.stride
    state = net.init_state(batch, frame_shape, dtype=dtype)
    ref = net.init_state(batch, frame_shape, dtype=dtype)
    compared = 0
    with torch.no_grad(), time_limit(LIMIT_S):
        for call in range(net.delay // s + 4):
            x = torch.randn(batch, frame_shape[0], s, *frame_shape[1:], dtype=dtype)
            with torch._dynamo.config.patch(error_on_recompile=call > 0):
                y, state = step(x, state)
            y_ref, ref = net.step_stride(x, ref)
            assert torch.equal(state["age"], ref["age"])
            for (name, a), (_, b) in zip(tree_leaves(state["tree"]), tree_leaves(ref["tree"]),
                                         strict=True):
                torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=f"state {name}")
            if bool(net.ready(state).all()):
                torch.testing.assert_close(y, y_ref, rtol=tol, atol=tol)
                compared += 1
    return compared


def _encoder(layers: int, **options) -> cs.CoModule:
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True, **options)
    source = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False).eval()
    return cs.continual(source, temporal_window=5).eval()


def _strided(stride: int) -> cs.CoModule:
    return cs.continual(nn.Sequential(
        nn.Conv1d(3, 6, 3, padding=1), nn.ReLU(),
        nn.Conv1d(6, 6, 3, stride=stride, padding=1, padding_mode="replicate"),
        nn.MaxPool1d(2, stride=1), nn.Conv1d(6, 2, 3),
    )).eval()


NETS = {
    "strided conv, stride 2": (lambda: _strided(2), (3,)),
    # the layer kinds of the zoo's 3D CNNs (batch norm, spatially strided max pool, residual)
    "residual 3d": (lambda: cs.Sequential(
        cs.Conv3d(2, 4, 3, padding=1), nn.BatchNorm3d(4), nn.ReLU(),
        cs.MaxPool3d((1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1)),
        cs.Residual(cs.Conv3d(4, 4, (3, 1, 1))),
        cs.AdaptiveAvgPool3d((1, 1, 1), window=3), cs.Reshape(-1), cs.Linear(4, 3)).eval(),
        (2, 5, 5)),
    # retroactive, regular and single-output attention (1 and 2 layers: CoOadTR in the zoo)
    "3-layer transformer encoder": (lambda: _encoder(3, norm_first=True, activation="gelu"),
                                    (8,)),
    "2-layer LSTM": (lambda: cs.continual(nn.LSTM(4, 6, num_layers=2)).eval(), (4,)),
}


@pytest.mark.parametrize("name", list(NETS))
def test_compile_step_matches_eager_stepping(name: str, one_thread: None) -> None:
    """Inductor-compiled stride steps equal eager stepping (float64), without recompiling;
    RNNs compile without the caller switching on dynamo's ``allow_rnn``."""
    factory, frame_shape = NETS[name]
    net = factory().to(D)
    assert _matches_eager(net, frame_shape, compile_step(net, force=True), D, 1e-10) >= 3
    assert not torch._dynamo.config.allow_rnn


def test_compile_step_compiles_any_number_of_modules(one_thread: None) -> None:
    """Each module gets its own compiled code: more modules than dynamo's recompile limit."""
    torch._dynamo.reset()
    nets = [cs.Conv1d(2, c, 2) for c in range(1, torch._dynamo.config.recompile_limit + 3)]
    for net in nets:
        step = compile_step(net, backend="eager")
        state = net.init_state(1)
        with torch.no_grad():
            y, _ = step(torch.ones(1, 2, 1), state)
        assert y.shape == (1, net.out_channels)


def test_compile_step_refuses_what_it_cannot_step() -> None:
    with pytest.raises(TypeError, match="continual module"):
        compile_step(nn.Conv1d(2, 2, 3))
    offline = offline_zoo_models()
    if offline:
        with pytest.raises(ValueError, match=r"offline model \(streamable=False\)"):
            compile_step(small_zoo_model(offline[0])[0])


#: Star skeleton models aside (their layers are traced in the strided versions, on 4, 2 and 1
#: frames per call; test_skeleton.py steps them): 15 s of CPU.
ZOO = {n: v for n, v in streamable_zoo_layer_sets().items() if not n.endswith("_star")}
#: Zoo models also compiled with inductor (the rest run dynamo's graph only). One: inductor's
#: code for the layer kinds of the 3D CNNs is checked on "residual 3d" above (compiling
#: CoSlow-R50 with inductor as well took 25 s of CPU and timed out on a loaded machine).
INDUCTOR = {"cooadtr_b2"}


@pytest.mark.parametrize("name", list(ZOO), ids=["=".join(ZOO[n]) for n in ZOO])
def test_compiled_zoo_step_matches_eager_stepping(name: str, one_thread: None) -> None:
    """Every kind of streamable zoo model's stride step (star skeleton models aside, see
    ``ZOO``) compiles as one graph (``fullgraph=True``) and equals eager stepping (float32).
    Tracing a zoo model takes seconds, inductor's code generation up to a minute: the graph
    runs on dynamo's ``eager`` backend, and the models in ``INDUCTOR`` also through inductor.
    Names built from the same layers at the test size (test id ``a=b``: one architecture, or a
    deeper stack of the same blocks such as X3D-L's) are compiled once, on the shallowest."""
    net, frame_shape = small_zoo_model(name)
    backends = ["eager", "inductor"] if name in INDUCTOR else ["eager"]
    for backend in backends:
        step = compile_step(net, backend=backend, force=True)
        assert _matches_eager(net, frame_shape, step, torch.float32, 1e-4) >= 3
