"""``continual(model)``: parameter names and sharing, unsupported modules, handler registries."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import Tensor, nn

import costream as cs
import costream.convert
import costream.modules._pointwise
from costream.testing import assert_streaming_equivalent

D = torch.float64


@pytest.fixture
def registries():
    """Undo every registration a test makes in the handler and point-wise registries."""
    handlers = dict(costream.convert._HANDLERS)
    pointwise = set(costream.modules._pointwise._POINTWISE)
    yield
    costream.convert._HANDLERS.clear()
    costream.convert._HANDLERS.update(handlers)
    costream.modules._pointwise._POINTWISE.clear()
    costream.modules._pointwise._POINTWISE.update(pointwise)


def _model() -> nn.Sequential:
    bn = nn.BatchNorm3d(8)
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2.0)
    return nn.Sequential(OrderedDict([
        ("stem", nn.Conv3d(3, 8, (3, 3, 3), padding=(1, 1, 1))),
        ("bn", bn),
        ("act", nn.ReLU()),
        ("pool", nn.MaxPool3d((1, 2, 2))),
        ("block", nn.Sequential(nn.Conv3d(8, 8, (3, 1, 1), bias=False), nn.Hardswish(),
                                nn.AvgPool3d((2, 1, 1), stride=1))),
    ])).eval()


def test_state_dict_keys_and_strict_load() -> None:
    model = nn.Sequential(nn.Conv1d(3, 8, 3), nn.BatchNorm1d(8), nn.ReLU(),
                          nn.Sequential(nn.Conv1d(8, 4, 3, stride=2), nn.MaxPool1d(2)),
                          nn.Linear(4, 2))
    co = cs.continual(model)
    assert co.state_dict().keys() == model.state_dict().keys()
    assert [n for n, _ in co.named_parameters()] == [n for n, _ in model.named_parameters()]
    assert [n for n, _ in co.named_buffers()] == [n for n, _ in model.named_buffers()]
    # a checkpoint of another instance of the offline model loads strictly
    other = nn.Sequential(nn.Conv1d(3, 8, 3), nn.BatchNorm1d(8), nn.ReLU(),
                          nn.Sequential(nn.Conv1d(8, 4, 3, stride=2), nn.MaxPool1d(2)),
                          nn.Linear(4, 2))
    result = co.load_state_dict(other.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    for name, p in co.state_dict().items():
        assert torch.equal(p, other.state_dict()[name]), name


def test_parameters_are_shared_with_the_source() -> None:
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1), nn.Linear(5, 3))
    co = cs.continual(model)
    for (name, p), (_, q) in zip(model.named_parameters(), co.named_parameters(), strict=True):
        assert p is q, name
    with torch.no_grad():
        model[0].weight.add_(1.0)
    x = torch.randn(1, 2, 6, 5)
    torch.testing.assert_close(co[0](x), model[0](x))


def test_converted_model_matches_torch_model() -> None:
    model = _model().to(D)
    co = cs.continual(model)
    assert co.state_dict().keys() == model.state_dict().keys()
    x = torch.randn(2, 3, 9, 6, 6, dtype=D)
    assert_streaming_equivalent(co, x, model)


def test_adaptive_pool_needs_window() -> None:
    with pytest.raises(TypeError, match="temporal_window"):
        cs.continual(nn.AdaptiveAvgPool2d((1, 3)))
    pool = cs.continual(nn.AdaptiveMaxPool2d((1, 3)), temporal_window=5)
    assert isinstance(pool, cs.AdaptiveMaxPool2d) and pool.window == 5


def test_continual_modules_pass_through() -> None:
    conv = cs.Conv1d(2, 2, 3)
    assert cs.continual(conv) is conv
    seq = cs.continual(nn.Sequential(conv, nn.ReLU()))
    assert seq[0] is conv


class _CumSum(nn.Module):
    """Mixes time (a running sum) and has no handler."""

    def forward(self, x: Tensor) -> Tensor:
        return x.cumsum(2)


def test_time_mixing_module_without_handler_raises_with_path() -> None:
    model = nn.Sequential(OrderedDict([
        ("stem", nn.Conv1d(2, 4, 3)),
        ("body", nn.Sequential(nn.ReLU(), _CumSum())),
    ]))
    with pytest.raises(cs.NotStreamableError) as info:
        cs.continual(model)
    (blocker,) = info.value.blockers
    assert (blocker.path, blocker.op) == ("body.1", "Tensor.cumsum")
    assert blocker.line.startswith(__file__) and "mixes time steps" in blocker.reason
    with pytest.raises(cs.NotStreamableError, match=r"the model itself: Tensor\.cumsum"):
        cs.continual(_CumSum(), example=torch.randn(1, 2, 6))


def test_container_child_without_handler_is_named() -> None:
    """A continual container built directly names the offending child, not 'the model itself'."""
    with pytest.raises(TypeError, match=r"_CumSum \('1'\)"):
        cs.Sequential(cs.Conv1d(2, 2, 1), _CumSum())


class _Block(nn.Module):
    """A residual block whose forward costream cannot read."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(channels, channels, 3, padding=1)
        self.act = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(x + self.conv(x))


def test_custom_module_with_children_is_traced() -> None:
    model = nn.Sequential(nn.Conv1d(2, 4, 1), _Block(4)).to(D)
    co = cs.continual(model)
    assert isinstance(co, cs.Graph) and co.delay == 1
    assert list(co.state_dict()) == list(model.state_dict())
    assert_streaming_equivalent(co, torch.randn(2, 2, 10, dtype=D), model)
    # a container built directly cannot trace its child: the error says what to do
    with pytest.raises(TypeError, match=r"_Block \('0'\).*example=.*register_handler"):
        cs.Sequential(_Block(4))


def test_register_handler(registries) -> None:
    calls = []

    def handler(block: _Block, convert, **options) -> nn.Module:
        calls.append(options)
        return cs.Sequential(cs.Residual(convert(block.conv, "conv")), block.act)

    assert cs.register_handler(_Block, handler) is handler
    model = nn.Sequential(nn.Conv1d(2, 4, 1), _Block(4)).to(D)
    co = cs.continual(model, temporal_window=3)
    assert calls == [{"temporal_window": 3, "attention": "exact"}]
    assert co.get_submodule("1.0.0").weight is model[1].conv.weight
    x = torch.randn(2, 2, 10, dtype=D)
    assert_streaming_equivalent(co, x, model)


def test_register_handler_as_decorator_without_options(registries) -> None:
    @cs.register_handler(_Block)
    def handler(block: _Block, convert) -> nn.Module:  # takes no options: still works
        return cs.Sequential(cs.Residual(convert(block.conv)), block.act)

    co = cs.continual(_Block(3))
    assert co.delay == 1
    assert costream.convert._HANDLERS[_Block] is handler


def test_handler_errors_propagate(registries) -> None:
    def handler(block: _Block, convert, **options) -> nn.Module:
        raise TypeError("this block is not supported")

    cs.register_handler(_Block, handler)
    with pytest.raises(TypeError, match="this block is not supported"):
        cs.continual(_Block(2))


class _Square(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x * x


def test_register_pointwise(registries) -> None:
    model = nn.Sequential(nn.Conv1d(2, 3, 3), _Square()).to(D)
    with pytest.raises(TypeError, match=r"register_pointwise\(_Square\)"):
        cs.Sequential(cs.Conv1d(2, 3, 3), _Square())  # a container cannot trace its child
    traced = cs.continual(model)  # the model can: x * x acts on each frame
    assert isinstance(traced, cs.Graph)
    assert_streaming_equivalent(traced, torch.randn(2, 2, 8, dtype=D), model)
    assert cs.register_pointwise(_Square) is _Square
    co = cs.continual(model)
    assert co[1] is model[1]
    assert_streaming_equivalent(co, torch.randn(2, 2, 8, dtype=D), model)


def test_softmax_over_channels_is_pointwise() -> None:
    co = cs.continual(nn.Sequential(nn.Conv1d(2, 3, 1), nn.Softmax(dim=1)))
    assert isinstance(co[1], nn.Softmax)
    with pytest.raises(TypeError, match="Softmax"):
        cs.continual(nn.Sequential(nn.Conv1d(2, 3, 1), nn.Softmax(dim=2)))


def test_unsupported_layer_options_are_rejected() -> None:
    with pytest.raises(ValueError, match="padding_mode 'zeros' and 'replicate'"):
        cs.continual(nn.Conv1d(2, 2, 3, padding=1, padding_mode="circular"))
    with pytest.raises(ValueError, match="ceil_mode"):
        cs.continual(nn.MaxPool1d(2, ceil_mode=True))
    with pytest.raises(ValueError, match="count_include_pad"):
        cs.continual(nn.AvgPool1d(3, padding=1, count_include_pad=False))
    with pytest.raises(ValueError, match="temporal padding 3 exceeds"):
        cs.Conv1d(1, 1, 2, padding=3)
