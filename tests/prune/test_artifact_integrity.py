"""Task artifacts store the whole task and refuse files that were damaged or edited.

The base is a small float64 conv net with a batch norm; the task adds SPLoRA adapters, is
pruned and trained a few steps in train mode (which moves the frozen batch norm's statistics).
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from costream.prune import apply_masks, kept_masks, prune
from costream.prune.adapters import SPLoRAConfig, add_adapters, load_artifact, save_artifact


def _base() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict(
        stem=nn.Conv1d(3, 8, 3, padding=1), norm=nn.BatchNorm1d(8), act=nn.ReLU(),
        body=nn.Conv1d(8, 8, 3, padding=1), act2=nn.ReLU(), out=nn.Conv1d(8, 4, 1),
    )).double().eval()


def _trained_task(base: nn.Module, steps: int = 3) -> nn.Module:
    task = add_adapters(copy.deepcopy(base), SPLoRAConfig(rank=2, init_scale=0.1))
    prune(task, torch.randn(1, 3, 10, dtype=torch.float64), "l1", density=0.5)
    task.train()
    opt = torch.optim.SGD([p for p in task.parameters() if p.requires_grad], lr=0.1)
    for _ in range(steps):
        loss = task(torch.randn(4, 3, 10, dtype=torch.float64)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return task.eval()


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, nn.Module, Path]:
    base = _base()
    task = _trained_task(base)
    path = tmp_path_factory.mktemp("artifact") / "task.safetensors"
    save_artifact(path, task, base)
    return base, task, path


def _edited(path: Path, tmp_path: Path, edit: Callable[[dict[str, Tensor]], None]) -> Path:
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    edit(tensors)
    out = tmp_path / "edited.safetensors"
    save_file(tensors, str(out), metadata=meta)
    return out


def test_batch_norm_statistics_moved_by_training_are_stored(setup) -> None:
    base, task, path = setup
    assert int(task.norm.num_batches_tracked) == 3  # training moved the frozen norm's stats
    x = torch.randn(2, 3, 10, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(load_artifact(path, base)(x), task(x), rtol=1e-12, atol=1e-12)
    stored = load_file(str(path))
    assert "buffer/norm.running_mean" in stored and "buffer/norm.running_var" in stored


def test_unknown_entry_is_refused(setup, tmp_path: Path) -> None:
    base, _, path = setup
    bad = _edited(path, tmp_path, lambda t: t.__setitem__("extra/x", torch.zeros(2)))
    with pytest.raises(ValueError, match=r"unknown entries \['extra/x'\]"):
        load_artifact(bad, base)


def test_missing_param_entry_is_refused(setup, tmp_path: Path) -> None:
    base, _, path = setup
    bad = _edited(path, tmp_path, lambda t: t.pop("param/body.base_layer.bias"))
    with pytest.raises(ValueError, match=r"missing or renamed: \['param/body\.base_layer\.bias'\]"):
        load_artifact(bad, base)


def test_swapped_entries_are_refused(setup, tmp_path: Path) -> None:
    base, _, path = setup

    def swap(t: dict[str, Tensor]) -> None:
        a, b = "param/stem.base_layer.bias", "param/body.base_layer.bias"
        assert t[a].shape == t[b].shape
        t[a], t[b] = t[b], t[a]

    with pytest.raises(ValueError, match="content checksum mismatch"):
        load_artifact(_edited(path, tmp_path, swap), base)


def test_flipped_mask_bit_is_refused(setup, tmp_path: Path) -> None:
    base, _, path = setup

    def flip(t: dict[str, Tensor]) -> None:
        mask = t["mask/stem/out"]
        mask[int(mask.nonzero()[0])] = False

    with pytest.raises(ValueError, match="content checksum mismatch"):
        load_artifact(_edited(path, tmp_path, flip), base)


def test_apply_masks_keeps_frozen_base_weights_frozen(tmp_path: Path) -> None:
    base = _base()
    pruned = copy.deepcopy(base)
    prune(pruned, torch.randn(1, 3, 10, dtype=torch.float64), "l1", density=0.5)
    task = add_adapters(copy.deepcopy(base), SPLoRAConfig(rank=2))
    trainable = {n for n, p in task.named_parameters() if p.requires_grad}
    apply_masks(task, kept_masks(pruned))
    assert {n for n, p in task.named_parameters() if p.requires_grad} == trainable
    save_artifact(tmp_path / "t.safetensors", task, base)
    stored = load_file(str(tmp_path / "t.safetensors"))
    assert not [k for k in stored if k.endswith("base_layer.weight")]
