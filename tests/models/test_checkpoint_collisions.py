"""Checkpoint loaders refuse two keys that rename onto one model key (the later would win)."""

from __future__ import annotations

import pytest
import torch

from costream.models import CheckpointError, create_model, load_checkpoint, map_checkpoint


def test_video_checkpoint_with_two_keys_for_one_weight_is_refused() -> None:
    model = create_model("x3d_xs")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    # PyTorchVideo's name of the stem's spatial conv, next to costream's own name of it
    state["blocks.0.conv.conv_t.weight"] = torch.zeros_like(state["stem.conv_s.weight"])
    with pytest.raises(CheckpointError, match=r"'stem\.conv_s\.weight' and "
                                              r"'blocks\.0\.conv\.conv_t\.weight' both map"):
        load_checkpoint(model, state, layout="pytorchvideo")
    with pytest.raises(CheckpointError, match=r"both map to the model key 'stem\.conv_s\.weight'"):
        map_checkpoint(state, model, layout="pytorchvideo")


@pytest.mark.parametrize("extra", ["model.fc.weight", "layers.layer1.gcn.bn.weight"])
def test_skeleton_checkpoint_with_two_keys_for_one_weight_is_refused(extra: str) -> None:
    model = create_model("st_gcn", num_classes=4)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    own = extra.removeprefix("model.").replace(".gcn.", ".main.gcn.")
    assert own in state
    state[extra] = torch.zeros_like(state[own])
    with pytest.raises(CheckpointError, match=rf"'{own}' and '{extra}' both map"):
        load_checkpoint(model, state)
