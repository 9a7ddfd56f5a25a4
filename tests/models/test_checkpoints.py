"""Published-checkpoint loading: PyTorchVideo's own models as the reference, PySlowFast's key
layout, and the errors for checkpoints that do not fit.

PyTorchVideo (PyPI ``pytorchvideo``, random weights) imports ``torchvision.ops`` at import time;
no torchvision wheel works with this torch, so a stand-in module provides the one name it
imports while PyTorchVideo is imported (and is removed again afterwards).
"""

from __future__ import annotations

import importlib
import re
import sys
import types
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from torch import nn

from costream.models import (
    CheckpointError,
    create_model,
    kinetics400_classes,
    load_checkpoint,
    map_checkpoint,
)

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")

SIZE = 64  # spatial size of the reference clips (X3D and ResNet heads pool 2x2 maps)


@contextmanager
def torchvision_stand_in() -> Iterator[None]:
    """``torchvision`` / ``torchvision.ops`` modules with the names PyTorchVideo imports."""
    if importlib.util.find_spec("torchvision") is not None:
        yield
        return
    tv, ops = types.ModuleType("torchvision"), types.ModuleType("torchvision.ops")

    class RoIAlign(nn.Module):  # only used by detection heads, never built here
        pass

    ops.RoIAlign = RoIAlign
    tv.ops = ops
    saved = {k: sys.modules.get(k) for k in ("torchvision", "torchvision.ops")}
    sys.modules.update({"torchvision": tv, "torchvision.ops": ops})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


@pytest.fixture(scope="module")
def ptv() -> types.SimpleNamespace:
    with torchvision_stand_in():
        from pytorchvideo.models.resnet import create_resnet
        from pytorchvideo.models.x3d import create_x3d
    return types.SimpleNamespace(create_x3d=create_x3d, create_resnet=create_resnet)


def randomize(model: nn.Module) -> nn.Module:
    """Non-trivial batch-norm statistics and affine parameters, eval mode."""
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
    return model.eval()


def reference(ptv: types.SimpleNamespace, name: str) -> tuple[nn.Module, int]:
    """PyTorchVideo's network behind ``name`` (logits), sized for ``SIZE``, and its clip length."""
    if name in ("x3d_s", "x3d_m"):
        t = 5
        net = ptv.create_x3d(input_clip_length=t, input_crop_size=SIZE, depth_factor=2.2,
                             head_activation=None)
    elif name == "slow_r50":
        t = 8
        net = ptv.create_resnet(model_depth=50, stem_conv_kernel_size=(1, 7, 7),
                                head_pool_kernel_size=(t, SIZE // 32, SIZE // 32))
    else:
        t = 8
        net = ptv.create_resnet(
            model_depth=50, stem_conv_kernel_size=(5, 7, 7), stage1_pool=nn.MaxPool3d,
            stage_conv_a_kernel_size=((3, 1, 1), [(3, 1, 1), (1, 1, 1)],
                                      [(3, 1, 1), (1, 1, 1)], [(1, 1, 1), (3, 1, 1)]),
            head_pool_kernel_size=(t // 2, SIZE // 32, SIZE // 32))
    return randomize(net), t


@pytest.mark.parametrize("name", ["x3d_s", "x3d_m", "slow_r50", "i3d_r50"])
def test_pytorchvideo_checkpoint_reproduces_pytorchvideo(ptv: types.SimpleNamespace, name: str,
                                                         tmp_path: Path) -> None:
    ref, t = reference(ptv, name)
    path = tmp_path / f"{name}.pyth"
    torch.save({"model_state": ref.state_dict(), "model_epoch": 1}, path)
    model = create_model(name, checkpoint=path, clip_length=t, crop_size=SIZE,
                         head_activation=None)
    x = torch.randn(2, 3, t, SIZE, SIZE)
    with torch.no_grad():
        expected = ref(x)
        got = model(x)
    assert got.shape == (2, 400, 1)
    scale = expected.abs().max().item()
    torch.testing.assert_close(got[:, :, 0], expected, rtol=1e-4, atol=1e-4 * scale)


def test_continual_model_loads_the_offline_checkpoint(ptv: types.SimpleNamespace,
                                                      tmp_path: Path) -> None:
    ref, _ = reference(ptv, "x3d_s")
    path = tmp_path / "x3d_s.pyth"
    torch.save({"model_state": ref.state_dict()}, path)
    model = create_model("cox3d_s", checkpoint=path, head_pool=64)
    assert model.res2_shortcut_bn is False  # PyTorchVideo's variant, read off the checkpoint
    for key, value in ref.state_dict().items():
        if key.endswith("conv_b.weight"):
            mapped = next(iter(map_checkpoint({key: value}, model)))
            assert torch.equal(model.state_dict()[mapped], value)


# ------------------------------------------------------------------ PySlowFast key layout
def to_pyslowfast(state: dict[str, torch.Tensor], x3d: bool) -> dict[str, torch.Tensor]:
    """Rename a costream zoo state dict to PySlowFast's layout (REFERENCE.md, section 5)."""
    out = {}
    for key, value in state.items():
        k = key
        if x3d:
            k = re.sub(r"^stem\.conv_s\.", "s1.pathway0_stem.conv_xy.", k)
            k = re.sub(r"^stem\.conv_t\.", "s1.pathway0_stem.conv.", k)
        else:
            k = re.sub(r"^stem\.conv\.", "s1.pathway0_stem.conv.", k)
        k = re.sub(r"^stem\.bn\.", "s1.pathway0_stem.bn.", k)
        k = re.sub(r"^res(\d)\.(\d+)\.", r"s\1.pathway0_res\2.", k)
        k = k.replace(".branches.shortcut.conv.", ".branch1.")
        k = k.replace(".branches.shortcut.bn.", ".branch1_bn.")
        k = re.sub(r"\.branches\.main\.conv_([abc])\.", r".branch2.\1.", k)
        k = re.sub(r"\.branches\.main\.bn_([abc])\.", r".branch2.\1_bn.", k)
        k = k.replace(".branches.main.se.", ".branch2.se.")
        k = k.replace("head.conv.", "head.conv_5.").replace("head.bn.", "head.conv_5_bn.")
        k = k.replace("head.fc.", "head.lin_5.").replace("head.proj.", "head.projection.")
        out[k] = value
    return out


@pytest.mark.parametrize("name", ["x3d_s", "slow_r50"])
def test_pyslowfast_checkpoint_loads(name: str, tmp_path: Path) -> None:
    t = 8 if name == "slow_r50" else 4
    options = {"num_classes": 5, "head_activation": None, "clip_length": t}
    source = randomize(create_model(name, **options))
    state = to_pyslowfast(source.state_dict(), x3d=name.startswith("x3d"))
    assert "s2.pathway0_res0.branch1_bn.weight" in state  # PySlowFast's res2 shortcut BN
    path = tmp_path / f"{name}.pyth"
    torch.save({"model_state": state, "cfg": "X3D_S.yaml"}, path)
    model = create_model(name, checkpoint=path, **options)
    x = torch.randn(1, 3, t, SIZE, SIZE)
    with torch.no_grad():
        torch.testing.assert_close(model(x), source(x), rtol=0, atol=0)


# ------------------------------------------------------------------ errors
def x3d_xs_state(tmp_path: Path, **edits: torch.Tensor | None) -> Path:
    state = create_model("x3d_xs").state_dict()
    state = {k.replace("head.proj.", "head.projection."): v for k, v in state.items()}
    state = to_pyslowfast(state, x3d=True)
    for key, value in edits.items():
        key = key.replace("__", ".")
        if value is None:
            del state[key]
        else:
            state[key] = value
    path = tmp_path / "ckpt.pyth"
    torch.save({"model_state": state}, path)
    return path


def test_missing_and_unexpected_keys_are_named(tmp_path: Path) -> None:
    path = x3d_xs_state(tmp_path, s3__pathway0_res1__branch2__b__weight=None,
                        head__lin_5_bn__weight=torch.ones(2048))
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(create_model("x3d_xs"), path)
    message = str(err.value)
    assert "missing keys (1)" in message and "res3.1.branches.main.conv_b.weight" in message
    assert "unexpected keys (1)" in message and "head.lin_5_bn.weight" in message
    assert "pyslowfast layout" in message


def test_shape_mismatch_is_named(tmp_path: Path) -> None:
    path = x3d_xs_state(tmp_path)
    with pytest.raises(CheckpointError, match=re.escape(
            "head.projection.weight: checkpoint (400, 2048), model (10, 2048)")):
        load_checkpoint(create_model("x3d_xs", num_classes=10), path)
    # non-strict loading ignores missing keys but never a shape mismatch
    with pytest.raises(CheckpointError, match="shape mismatches"):
        load_checkpoint(create_model("x3d_xs", num_classes=10), path, strict=False)


def test_architecture_variant_mismatch_gives_a_hint(tmp_path: Path) -> None:
    path = x3d_xs_state(tmp_path, s2__pathway0_res0__branch1_bn__weight=None,
                        s2__pathway0_res0__branch1_bn__bias=None,
                        s2__pathway0_res0__branch1_bn__running_mean=None,
                        s2__pathway0_res0__branch1_bn__running_var=None,
                        s2__pathway0_res0__branch1_bn__num_batches_tracked=None)
    with pytest.raises(CheckpointError, match="res2_shortcut_bn=False"):
        load_checkpoint(create_model("x3d_xs"), path)
    assert create_model("x3d_xs", checkpoint=path).res2_shortcut_bn is False


def test_checkpoints_are_read_without_running_code(tmp_path: Path) -> None:
    path = tmp_path / "evil.pyth"
    torch.save({"model_state": {"w": torch.zeros(1)}, "hook": RuntimeError("x")}, path)
    with pytest.raises(Exception, match=r"[Ww]eights only"):
        load_checkpoint(create_model("x3d_xs"), path)


def test_non_state_dict_is_rejected() -> None:
    with pytest.raises(CheckpointError, match="state dict of tensors"):
        load_checkpoint(create_model("x3d_xs"), {"model_state": {"epoch": 3}})


def test_kinetics_class_names_ship_with_the_package() -> None:
    names = kinetics400_classes()
    assert len(names) == len(set(names)) == 400
    assert names == sorted(names)
    assert names[:2] == ["abseiling", "air drumming"] and names[-1] == "zumba"
