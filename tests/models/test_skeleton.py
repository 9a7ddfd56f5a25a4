"""The skeleton zoo (ST-GCN, AGCN, S-TR and their continual versions) against the streaming
contract, the published computation and the published checkpoint layout.

Driven by ``list_models(family="skeleton")``; networks are narrow (``width=8``) and run in
float64. The published computation is the independent reference in
``test_skeleton_reference.py``.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import pytest
import torch
from test_skeleton_reference import published_state, reference_forward
from torch import nn

from costream.models import (
    STGCN,
    CheckpointError,
    create_model,
    list_models,
    load_checkpoint,
    model_family,
)
from costream.testing import assert_streaming_equivalent
from models._inputs import one_per_architecture

ARCH = {"st_gcn": "st_gcn", "cost_gcn": "st_gcn", "cost_gcn_star": "st_gcn", "agcn": "agcn",
        "coagcn": "agcn", "coagcn_star": "agcn", "s_tr": "s_tr", "cos_tr": "s_tr",
        "cos_tr_star": "s_tr"}
WIDTH, HEADS, CLASSES = 8, 2, 5
STRIDED_CLIP, STAR_CLIP = 8, 84  # star: 80 frames for the convolutions, 4 for the head


def small(name: str, **kwargs: Any) -> STGCN:
    """``name`` at width 8, 5 classes, short clips, non-trivial statistics, float64."""
    kwargs.setdefault("clip_length", STAR_CLIP if name.endswith("_star") else STRIDED_CLIP)
    model = create_model(name, num_classes=CLASSES, width=WIDTH, heads=HEADS, **kwargs).double()
    gen = torch.Generator().manual_seed(3)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    for name_, p in model.named_parameters():
        if name_.endswith("graph_attn"):
            p.data.copy_(torch.rand(p.shape, generator=gen) + 0.5)
    return model


def skeletons(batch: int, frames: int, joints: int = 25, persons: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, frames, joints, persons, dtype=torch.float64)


def test_registry_lists_the_skeleton_family() -> None:
    assert list_models(family="skeleton") == sorted(ARCH)
    assert all(model_family(n) == "skeleton" for n in ARCH)


#: one name per architecture at the test size (test id ``a=b``): twins such as cost_gcn and
#: st_gcn compute alike (test_onnx.py checks it), so they are stepped once
SKELETONS = one_per_architecture(list_models(family="skeleton"))


@pytest.mark.parametrize("name", list(SKELETONS), ids=["=".join(v) for v in SKELETONS.values()])
def test_registered_model_streams_exactly(name: str) -> None:
    """Stepping equals ``forward`` over the whole stream (float64, batch of 2 streams)."""
    model = small(name)
    assert not model.training
    x = skeletons(2, model.delay + 3 * model.temporal.stride)
    if not model.streamable:
        assert model(x).shape == (2, CLASSES, x.shape[2] // 4 - 1)
        for step in (lambda: model.forward_step(x[:, :, 0]), lambda: model.forward_steps(x)):
            with pytest.raises(RuntimeError, match="adjacency_scope='frame'"):
                step()
        return
    assert model.temporal.stride == (1 if name.endswith("_star") else 4)
    # the published computation is compared in the tests below (test_skeleton_reference.py)
    assert_streaming_equivalent(model, x, self_consistency_only=True)


@pytest.mark.parametrize("name", ["cost_gcn", "cos_tr_star"])
def test_continual_models_stream_in_float32(name: str) -> None:
    """Float32 inference takes the oneDNN path for the per-frame products (all taps, and the
    strided convolutions' tap subsets)."""
    model = small(name).float()
    x = skeletons(1, model.delay + 3 * model.temporal.stride).float()
    assert_streaming_equivalent(model, x, check_batch=False, check_state=False,
                                self_consistency_only=True)


@pytest.mark.parametrize("name", ["cost_gcn_star", "coagcn_star", "cos_tr_star"])
def test_star_predictions_equal_the_model_on_each_window(name: str) -> None:
    """Without padding, each stepped prediction is ``forward`` on its own clip_length frames."""
    model = small(name)
    assert model.delay == STAR_CLIP - 1 and model.receptive_field == STAR_CLIP
    x = skeletons(1, STAR_CLIP + 3)
    with torch.no_grad():
        stepped = [model.forward_step(x[:, :, i]) for i in range(x.shape[2])]
        windows = [model(x[:, :, j: j + STAR_CLIP]) for j in range(4)]
    assert all(y is None for y in stepped[: STAR_CLIP - 1])
    for j, window in enumerate(windows):
        assert window.shape == (1, CLASSES, 1)
        torch.testing.assert_close(stepped[STAR_CLIP - 1 + j], window[:, :, 0],
                                   rtol=1e-10, atol=1e-10)


def test_default_configuration_is_the_published_one() -> None:
    strided, star = create_model("cost_gcn"), create_model("cost_gcn_star")
    assert strided.input_shape == star.input_shape == (3, 300, 25, 2)
    assert strided.num_classes == 60 and create_model("st_gcn", graph="kinetics").num_classes == 400
    # strided: 300 frames -> 75 after two stride-2 blocks; star: 300 - 10 * 8 = 220 frames
    assert (strided.head_pool, star.head_pool) == (75, 220)
    assert (strided.temporal.stride, star.temporal.stride) == (4, 1)
    assert star.receptive_field == 300
    convs = [m for m in strided.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (9, 1)]
    assert [c.stride[0] for c in convs] == [1, 1, 1, 1, 2, 1, 1, 2, 1, 1]
    assert all(c.padding[0] == 4 for c in convs)


@pytest.mark.parametrize("arch", ["st_gcn", "agcn", "s_tr"])
def test_offline_and_continual_versions_share_weights(arch: str) -> None:
    names = [n for n, a in ARCH.items() if a == arch]
    shapes = [{k: v.shape for k, v in create_model(n).state_dict().items()} for n in names]
    assert all(s == shapes[0] for s in shapes)


# ------------------------------------------------------------------ the published computation
@pytest.mark.parametrize(("name", "scope"), [
    ("st_gcn", "clip"), ("cost_gcn_star", "clip"), ("agcn", "clip"), ("coagcn", "frame"),
    ("coagcn_star", "frame"), ("s_tr", "clip"), ("cos_tr_star", "clip"),
])
def test_forward_equals_the_published_computation(name: str, scope: str, tmp_path: Path) -> None:
    """A published-layout checkpoint, loaded by ``create_model``, gives the published logits."""
    arch, star = ARCH[name], name.endswith("_star")
    state = published_state(arch, width=WIDTH, num_classes=CLASSES, joints=25, persons=2)
    path = tmp_path / "weights.pt"
    torch.save(state, path)
    model = create_model(name, checkpoint=path, num_classes=CLASSES, width=WIDTH, heads=HEADS,
                         clip_length=STAR_CLIP if star else 16).double()
    x = skeletons(2, model.clip_length)
    with torch.no_grad():
        got = model(x)
    assert got.shape == (2, CLASSES, 1)
    expected = reference_forward(state, x, arch, star=star, scope=scope, heads=HEADS)
    torch.testing.assert_close(got[:, :, 0], expected, rtol=1e-9, atol=1e-10)


def test_coagcn_approximates_agcn_and_equals_it_on_single_frames() -> None:
    """The frame-scope adjacency is AGCN's computed from one frame: equal on 1-frame clips,
    different on longer ones (where AGCN's spans the clip)."""
    offline = small("agcn", head_pool=1)
    online = small("coagcn", head_pool=1)
    online.load_state_dict(offline.state_dict())
    one, many = skeletons(2, 1), skeletons(2, 12)
    with torch.no_grad():
        torch.testing.assert_close(online(one), offline(one))
        assert (online(many) - offline(many)).abs().max() > 1e-4


def test_training_mode_runs_clips_and_refuses_to_step() -> None:
    model = small("cos_tr").train()
    x = skeletons(2, 8)
    model(x).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert grads["layers.layer1.main.gcn.graph_attn"].abs().sum() > 0
    assert grads["layers.layer4.main.gcn.attention_conv.qkv_conv.weight"].abs().sum() > 0
    with pytest.raises(RuntimeError, match=r"\.eval\(\)"):
        model.forward_step(x[:, :, 0])


# ------------------------------------------------------------------ checkpoints
def test_lightning_checkpoint_with_model_prefix_loads(tmp_path: Path) -> None:
    state = published_state("s_tr", width=WIDTH, num_classes=CLASSES, joints=25, persons=2)
    ckpt = {"epoch": 3, "global_step": 120, "pytorch-lightning_version": "1.5.0",
            "state_dict": {f"model.{k}": v for k, v in state.items()},
            "optimizer_states": [{"state": {}, "param_groups": [{"lr": 0.1}]}]}
    path = tmp_path / "epoch=3.ckpt"
    torch.save(ckpt, path)
    model = small("cos_tr")
    load_checkpoint(model, path)
    for key in ("layers.layer4.main.gcn.attention_conv.qkv_conv.weight",
                "layers.layer5.residual.t_conv.weight", "data_bn.running_var", "fc.bias"):
        published = key.replace("main.", "")
        torch.testing.assert_close(model.state_dict()[key], state[published])


def test_costream_state_dict_round_trips(tmp_path: Path) -> None:
    source = small("coagcn")
    path = tmp_path / "coagcn.pt"
    torch.save(source.state_dict(), path)
    model = create_model("coagcn_star", checkpoint=path, num_classes=CLASSES, width=WIDTH,
                         clip_length=STAR_CLIP).double()
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(),
                                                  model.state_dict().values()))


def test_checkpoint_errors_name_the_problem(tmp_path: Path) -> None:
    state = published_state("st_gcn", width=WIDTH, num_classes=CLASSES, joints=25, persons=2)
    model = small("cost_gcn")
    broken = dict(state)
    del broken["layers.layer3.gcn.g_conv.1.weight"]
    broken["layers.layer3.gcn.extra"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"(?s)missing keys.*layer3\.main\.gcn\.g_conv\.1"
                                              r".*unexpected keys.*layers\.layer3\.gcn\.extra"):
        load_checkpoint(model, broken)
    kinetics = small("cost_gcn", graph="kinetics")
    with pytest.raises(CheckpointError, match=r"data_bn\.weight: checkpoint \(150,\), model "
                                              r"\(108,\)"):
        load_checkpoint(kinetics, state)
    with pytest.raises(CheckpointError, match=r"layer1\.gcn\.g_conv\.0\.weight"):
        load_checkpoint(small("cos_tr"), published_state(
            "st_gcn", width=16, num_classes=CLASSES, joints=25, persons=2))
    path = tmp_path / "pickled.ckpt"
    with open(path, "wb") as fh:
        pickle.dump({"state_dict": state, "hyper_parameters": Path("x")}, fh, protocol=2)
    with pytest.raises(CheckpointError, match="weights_only"):
        load_checkpoint(model, path)


# ------------------------------------------------------------------ input checks
def test_bad_inputs_are_rejected_clearly() -> None:
    model = small("cost_gcn_star")
    with pytest.raises(ValueError, match=r"clips \(N, 3, T, 25, 2\)"):
        model(torch.randn(1, 3, 84, 18, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"frames \(N, 3, 25, 2\)"):
        model.forward_step(torch.randn(1, 3, 25, 1, dtype=torch.float64))
    model.reset_state()
    with pytest.raises(ValueError, match="4 dims"):
        model.forward_step(torch.randn(1, 3, 84, 25, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="receptive field"):
        create_model("cost_gcn_star", clip_length=80)
    with pytest.raises(ValueError, match="arch"):
        STGCN("gcn")
    with pytest.raises(ValueError, match="graph"):
        create_model("st_gcn", graph="coco")
    with pytest.raises(ValueError, match="adjacency_scope"):
        create_model("agcn", adjacency_scope="video")
    with pytest.raises(ValueError, match="heads"):
        create_model("s_tr", width=8, heads=8)
