"""Stream checkpoints are refused by a network of other layer types or other weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import costream as cs
from costream.runtime import StreamEngine, load_engine, load_stream, save_engine, save_stream
from costream.runtime._checkpoint import _write


def _net(act: type[nn.Module] = nn.ReLU, seed: int = 0) -> cs.CoModule:
    torch.manual_seed(seed)
    return cs.continual(nn.Sequential(nn.Conv1d(3, 4, 3, padding=1), nn.BatchNorm1d(4), act(),
                                      nn.Conv1d(4, 2, 3))).eval()


def _saved_engine(tmp_path, net: cs.CoModule, **kw) -> tuple[StreamEngine, object]:
    engine = StreamEngine(net, capacity=2, frame_shape=(3,))
    sid = engine.open()
    with torch.no_grad():
        for _ in range(3):
            engine.step({sid: torch.randn(3)})
    path = tmp_path / "streams.pt"
    save_engine(engine, path, **kw)
    return engine, path


def _fresh(net: cs.CoModule) -> StreamEngine:
    return StreamEngine(net, capacity=2, frame_shape=(3,))


def test_same_shaped_network_with_other_layer_types_is_refused(tmp_path) -> None:
    tanh, relu = _net(nn.Tanh), _net(nn.ReLU)
    relu.load_state_dict(tanh.state_dict())  # same weights, same state shapes
    _, path = _saved_engine(tmp_path, tanh)
    with pytest.raises(ValueError, match="different module: layer '2' is Tanh there, ReLU in "
                                         "this module"):
        load_engine(_fresh(relu), path)
    with pytest.raises(ValueError, match="layer '2' is Tanh there"):  # even without weights
        load_engine(_fresh(relu), path, check_weights=False)
    with torch.no_grad():
        tanh.forward_step(torch.randn(1, 3))
    save_stream(tanh, tmp_path / "one.pt")
    with pytest.raises(ValueError, match="layer '2' is Tanh there, ReLU in this module"):
        load_stream(relu, tmp_path / "one.pt")


def test_other_weights_are_refused_unless_asked(tmp_path) -> None:
    net = _net()
    _, path = _saved_engine(tmp_path, net)
    other = _net(seed=1)
    with pytest.raises(ValueError, match="other weights"):
        load_engine(_fresh(other), path)
    load_engine(_fresh(other), path, check_weights=False)
    load_engine(_fresh(net), path)  # the same weights: accepted
    _, unhashed = _saved_engine(tmp_path, net, hash_weights=False)
    load_engine(_fresh(other), unhashed)


@pytest.mark.parametrize("tensor", ["0.weight", "1.running_mean"])
def test_weights_changed_in_place_after_saving_are_noticed(tmp_path, tensor: str) -> None:
    net = _net()
    _, path = _saved_engine(tmp_path, net)
    with torch.no_grad():
        net.state_dict()[tensor].add_(1e-3)  # a parameter or a batch norm statistic
    with pytest.raises(ValueError, match="other weights"):
        load_engine(_fresh(net), path)


def test_files_of_the_first_format_are_refused_with_the_reason(tmp_path) -> None:
    path = tmp_path / "old.pt"
    _write(path, {"format": "costream-streams/1", "kind": "engine"})
    with pytest.raises(ValueError, match=r"lacks the layer types.*save the streams again"):
        load_engine(_fresh(_net()), path)


@pytest.mark.filterwarnings("ignore:parameters created under torch.inference_mode")
def test_a_module_built_in_inference_mode_is_hashed(tmp_path) -> None:
    with torch.inference_mode():  # its weights have no version counter
        net = _net()
        _, path = _saved_engine(tmp_path, net)
        load_engine(_fresh(net), path)
        with pytest.raises(ValueError, match="other weights"):
            load_engine(_fresh(_net(seed=1)), path)
