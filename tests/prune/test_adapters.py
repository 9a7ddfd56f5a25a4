"""Adapters: outputs equal before merge, after merge and after an artifact round trip (float64).

One table of cases (network, input, adapter config, whether to prune) drives the shared checks,
for Linear, Conv1d/2d/3d (plain and continual) and MultiheadAttention; mismatched artifacts must
be refused with a message that says what is wrong.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import costream as cs
from costream.prune import kept_masks, prune, task_storage
from costream.prune.adapters import (
    AdapterConfig,
    SPLoPAConfig,
    SPLoPALayer,
    SPLoRAConfig,
    SPLoRALayer,
    SPPaRAConfig,
    adapter_layers,
    add_adapters,
    load_artifact,
    merge_adapters,
    prune_blocks,
    save_artifact,
    unmerge_adapters,
)

TOL = {"rtol": 1e-12, "atol": 1e-12}


def _bn_stats(net: nn.Module) -> nn.Module:
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return net.eval().double()


def conv_net(nd: int, width: int = 8) -> nn.Module:
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[nd]
    bn = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[nd]
    return _bn_stats(nn.Sequential(OrderedDict(
        stem=conv(3, width, 3, padding=1), norm=bn(width), act=nn.ReLU(),
        body=conv(width, width, 3, padding=1), act2=nn.ReLU(),
        out=conv(width, 4, 1))))


def continual_net() -> nn.Module:
    return _bn_stats(cs.Sequential(
        cs.Conv3d(3, 8, 3, padding=1), nn.BatchNorm3d(8), nn.ReLU(),
        cs.Conv3d(8, 8, (3, 1, 1), padding=(1, 0, 0)), nn.ReLU(), cs.Conv3d(8, 4, 1)))


def linear_net() -> nn.Module:
    return nn.Sequential(OrderedDict(
        fc1=nn.Linear(12, 16), act=nn.ReLU(), fc2=nn.Linear(16, 16), act2=nn.GELU(),
        head=nn.Linear(16, 5))).double()


class AttentionNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(6, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.embed(x)
        return self.head(self.attn(h, h, h, need_weights=False)[0])


def attention_net() -> nn.Module:
    return AttentionNet().double()


# name -> (base factory, input shape, config factory, prune?)
Case = tuple[Callable[[], nn.Module], tuple[int, ...], Callable[[], AdapterConfig], bool]
CASES: dict[str, Case] = {
    "splora-linear": (linear_net, (4, 12), lambda: SPLoRAConfig(
        rank=3, init_scale=0.2, modules_to_save=["head"]), True),
    "splora-conv1d": (lambda: conv_net(1), (2, 3, 10), lambda: SPLoRAConfig(
        rank=2, init_scale=0.2), True),
    "splora-conv2d": (lambda: conv_net(2), (2, 3, 7, 7), lambda: SPLoRAConfig(
        rank=2, init_scale=0.2, target_modules=["stem", "body"]), True),
    "splora-conv3d": (lambda: conv_net(3), (2, 3, 4, 5, 5), lambda: SPLoRAConfig(
        rank=4, init_scale=0.2), True),
    "splora-continual-conv3d": (continual_net, (2, 3, 6, 5, 5), lambda: SPLoRAConfig(
        rank=2, init_scale=0.2), True),
    "splora-mha": (attention_net, (2, 5, 6), lambda: SPLoRAConfig(
        rank=2, init_scale=0.2, target_types=["MultiheadAttention"]), False),
    "sppara-conv1d": (lambda: conv_net(1), (2, 3, 10), lambda: SPPaRAConfig(init_scale=0.2), True),
    "sppara-conv2d": (lambda: conv_net(2), (2, 3, 7, 7), lambda: SPPaRAConfig(
        init_scale=0.2, target_modules=r"stem|body"), True),
    "sppara-conv3d": (lambda: conv_net(3), (2, 3, 4, 5, 5), lambda: SPPaRAConfig(
        init_scale=0.2), True),
    "splopa-linear": (linear_net, (4, 12), lambda: SPLoPAConfig(
        block_size=4, num_prototypes=5, rank=2, init_scale=0.2, modules_to_save=["head"]),
        False),
}


def derive(name: str) -> tuple[nn.Module, nn.Module, Tensor]:
    """(base, derived model with adapters, input); the derived model is pruned if the case says."""
    make_base, shape, make_config, do_prune = CASES[name]
    base = make_base()
    x = torch.randn(*shape, dtype=torch.float64)
    model = add_adapters(copy.deepcopy(base), make_config())
    if do_prune:
        prune(model, x[:1], "l1", density=0.5)
    if isinstance(make_config(), SPLoPAConfig):
        prune_blocks(model, 0.5)
    return base, model, x


def _out(model: nn.Module, x: Tensor) -> Tensor:
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize("name", list(CASES))
def test_outputs_equal_before_after_merge_and_after_artifact(name: str, tmp_path: Any) -> None:
    base, model, x = derive(name)
    before = _out(model, x)
    assert not torch.allclose(before, _out(base, x)), "the adapters should change the output"
    path = tmp_path / "task.safetensors"
    save_artifact(path, model, base)
    loaded = load_artifact(path, base)
    torch.testing.assert_close(_out(loaded, x), before, **TOL)
    assert sorted(adapter_layers(loaded)) == sorted(adapter_layers(model))
    merged = merge_adapters(model)
    assert not adapter_layers(merged)
    torch.testing.assert_close(_out(merged, x), before, **TOL)
    torch.testing.assert_close(_out(merge_adapters(loaded), x), before, **TOL)
    assert base_unchanged(base, CASES[name][0]())


def base_unchanged(base: nn.Module, fresh: nn.Module) -> bool:
    """Structure check: deriving a task never touches the base network's shapes."""
    a = {k: tuple(v.shape) for k, v in base.state_dict().items()}
    b = {k: tuple(v.shape) for k, v in fresh.state_dict().items()}
    return a == b


@pytest.mark.parametrize("name", ["splora-conv2d", "sppara-conv3d", "splora-mha"])
def test_unmerge_restores_adapter_forward(name: str) -> None:
    _, model, x = derive(name)
    before = _out(model, x)
    merge_adapters(model, unload=False)
    assert all(layer.merged for layer in adapter_layers(model).values())
    torch.testing.assert_close(_out(model, x), before, **TOL)
    unmerge_adapters(model)
    assert not any(layer.merged for layer in adapter_layers(model).values())
    torch.testing.assert_close(_out(model, x), before, **TOL)


def test_pruning_slices_adapters_with_base() -> None:
    base = conv_net(2)
    model = add_adapters(copy.deepcopy(base), SPLoRAConfig(rank=3))
    prune(model, torch.randn(1, 3, 7, 7, dtype=torch.float64), "l1", density=0.5)
    body = model.body
    assert isinstance(body, SPLoRALayer)
    assert tuple(body.lora_A["weight"].shape) == (3, 4)
    assert tuple(body.lora_B["weight"].shape) == (4, 3)
    assert body.base_layer.weight.shape[:2] == (4, 4)
    masks = kept_masks(model)
    assert int(masks["body"]["in"].sum()) == 4 and masks["body"]["in"].numel() == 8
    # learned: SPLoRA r (n_in' + n_out') + n_out' biases per layer
    stem, out = model.stem, model.out
    expected = (3 * (3 + 4) + 4) + (3 * (4 + 4) + 4) + (3 * (4 + 4) + 4)
    assert isinstance(stem, SPLoRALayer) and isinstance(out, SPLoRALayer)
    storage = task_storage(model)
    assert storage.learned == expected
    assert storage.buffers == 0
    # masks: out of stem, norm, body; in of body and out (8 channels each)
    assert storage.mask_bits == 8 * 5


def test_frozen_base_and_trainable_adapters() -> None:
    model = add_adapters(linear_net(), SPLoRAConfig(rank=2, modules_to_save=["head"]))
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == [
        "fc1.base_layer.bias", "fc1.lora_A.weight", "fc1.lora_B.weight",
        "fc2.base_layer.bias", "fc2.lora_A.weight", "fc2.lora_B.weight",
        "head.bias", "head.weight"]
    model(torch.randn(3, 12, dtype=torch.float64)).sum().backward()
    assert model.fc1.base_layer.weight.grad is None
    assert model.fc1.lora_A["weight"].grad is not None


def test_splopa_block_mask_and_shared_bank() -> None:
    _, model, _ = derive("splopa-linear")
    layers = [m for m in model.modules() if isinstance(m, SPLoPALayer)]
    assert len(layers) == 2 and layers[0].bank is layers[1].bank
    for layer in layers:
        assert int(layer.block_mask.sum()) == layer.block_mask.numel() // 2
    w = layers[0].adapted_weights()["weight"]
    blocks = w.reshape(4, 4, 3, 4).abs().sum((1, 3))
    assert torch.equal(blocks == 0, ~layers[0].block_mask)
    storage = task_storage(model)
    k = 5
    kept = sum(int(m.block_mask.sum()) for m in layers)
    bank = k * 4 * 2 * 2
    biases = 16 + 16
    head = 16 * 5 + 5
    assert storage.learned == k * kept + bank + biases + head
    assert storage.mask_bits == sum(m.block_mask.numel() for m in layers)
    merge_adapters(model, unload=False)
    with pytest.raises(RuntimeError, match="cannot be undone"):
        unmerge_adapters(model)


def test_adapted_continual_layer_streams_only_merged() -> None:
    _, model, x = derive("splora-continual-conv3d")
    with pytest.raises(RuntimeError, match="merge"):
        model.forward_step(x[:, :, 0])
    model.reset_state()
    merge_adapters(model, unload=False)
    y = model.forward_steps(x, pad_end=True)
    torch.testing.assert_close(y, model(x), **TOL)


# ---------------------------------------------------------------- mismatched artifacts


@pytest.fixture
def saved(tmp_path: Any) -> Any:
    base, model, _ = derive("splora-conv2d")
    path = tmp_path / "task.safetensors"
    save_artifact(path, model, base)
    return path


def test_artifact_refuses_wrong_shape(saved: Any) -> None:
    with pytest.raises(ValueError, match=r"shape mismatch.*covers 8 channels but .* has 10"):
        load_artifact(saved, conv_net(2, width=10))


def test_artifact_refuses_wrong_module_name(saved: Any) -> None:
    renamed = conv_net(2)
    renamed = nn.Sequential(OrderedDict(
        (("first" if k == "stem" else k), m) for k, m in renamed.named_children()))
    with pytest.raises(ValueError, match=r"module name mismatch.*'stem'"):
        load_artifact(saved, renamed)


def test_artifact_refuses_other_base(saved: Any) -> None:
    other = conv_net(2)  # same architecture, other weights
    with pytest.raises(ValueError, match="base checksum mismatch"):
        load_artifact(saved, other)


def test_artifact_refuses_merged_model_and_foreign_files(tmp_path: Any) -> None:
    base, model, _ = derive("splora-linear")
    merge_adapters(model, unload=False)
    with pytest.raises(ValueError, match="merged"):
        save_artifact(tmp_path / "a.safetensors", model, base)
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "b.safetensors"))
    with pytest.raises(ValueError, match="not a costream task artifact"):
        load_artifact(tmp_path / "b.safetensors", base)


def test_fine_pruned_model_round_trips_without_adapters(tmp_path: Any) -> None:
    base = conv_net(3)
    model = copy.deepcopy(base)
    x = torch.randn(2, 3, 4, 5, 5, dtype=torch.float64)
    prune(model, x[:1], "l2", density=0.25)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)  # "trained" in full
    save_artifact(tmp_path / "ft.safetensors", model, base)
    loaded = load_artifact(tmp_path / "ft.safetensors", base)
    torch.testing.assert_close(_out(loaded, x), _out(model.eval(), x), **TOL)
    storage = task_storage(model)
    assert storage.learned == sum(p.numel() for p in model.parameters())
    assert storage.buffers == 2 * model.norm.num_features


# ---------------------------------------------------------------- configs


@pytest.mark.parametrize("config", [
    SPLoRAConfig(rank=4, target_modules=["a", "b"], modules_to_save="head.*"),
    SPPaRAConfig(init="zeros", target_types=["Conv2d"], train_bias=False),
    SPLoPAConfig(num_prototypes=8, block_size=16, rank=2, init_scale=0.01),
])
def test_config_json_round_trip(config: AdapterConfig) -> None:
    text = config.to_json()
    again = AdapterConfig.from_json(text)
    assert again == config and type(again) is type(config)


@pytest.mark.parametrize("kwargs, message", [
    ({"rank": 0}, "rank"),
    ({"init": "gaussian"}, "init"),
    ({"init_scale": -1.0}, "init_scale"),
    ({"target_types": ["LSTM"]}, "adapts"),
    ({"target_modules": "("}, "regular expression"),
    ({"target_modules": [""]}, "target_modules"),
])
def test_config_validation(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SPLoRAConfig(**kwargs)


def test_config_rejects_unknown_method_and_fields() -> None:
    with pytest.raises(ValueError, match="unknown adapter method"):
        AdapterConfig.from_json('{"method": "lora"}')
    with pytest.raises(ValueError, match="unknown splora config fields"):
        AdapterConfig.from_json('{"method": "splora", "alpha": 2}')


def test_explicit_unsupported_target_is_an_error() -> None:
    net = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Conv2d(4, 4, 3))
    assert len(adapter_layers(add_adapters(copy.deepcopy(net), SPLoRAConfig()))) == 1
    with pytest.raises(ValueError, match="cannot adapt '0'"):
        add_adapters(copy.deepcopy(net), SPLoRAConfig(target_modules=["0"]))
    with pytest.raises(ValueError, match="match no adaptable module"):
        add_adapters(copy.deepcopy(net), SPLoRAConfig(target_modules=["7"]))
