"""The OadTR / CoOadTR training example runs end to end on a small synthetic feature pickle.

The pickle has THUMOS14's layout (``{video: {rgb, flow, anno}}``) with tiny widths: background
stretches alternate with action segments, and every frame's features are its class's mean plus
noise, so a model can learn the task in a few epochs (to a per-frame mAP of about 0.85; random
scores reach about 0.14).
"""

from __future__ import annotations

import importlib.util
import json
import pickle
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

from costream.models import create_model, pad_start, per_frame_map
from costream.testing import tolerances

ROOT = Path(__file__).resolve().parents[2]
CLASSES = 5  # background + 4 actions
RGB, FLOW = 12, 6


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("train_oadtr_example",
                                                  ROOT / "examples" / "train_oadtr.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_features(path: Path, seed: int = 0) -> dict:
    """Write a learnable THUMOS14-style pickle: 6 training and 2 test videos."""
    rng = np.random.default_rng(seed)
    means = rng.normal(0.0, 1.0, size=(CLASSES, RGB + FLOW))
    data = {}
    for name in [f"video_validation_{i}" for i in range(6)] + [f"video_test_{i}" for i in
                                                              range(2)]:
        labels: list[int] = []
        while len(labels) < 90:
            labels += [0] * int(rng.integers(6, 14))
            labels += [int(rng.integers(1, CLASSES))] * int(rng.integers(6, 14))
        y = np.array(labels)
        x = means[y] + rng.normal(0.0, 1.5, size=(len(y), RGB + FLOW))
        data[name] = {"rgb": x[:, :RGB].astype(np.float32),
                      "flow": x[:, RGB:].astype(np.float32),
                      "anno": np.eye(CLASSES, dtype=np.float32)[y]}
    path.write_bytes(pickle.dumps(data))
    return data


TINY = ["--window", "8", "--embed-dim", "16", "--heads", "2", "--mlp-dim", "16",
        "--dropout", "0", "--batch-size", "4", "--lr", "3e-3", "--quiet", "--threads", "1"]


@pytest.mark.parametrize(("model", "epochs"), [("cooadtr_b2", 12), ("cooadtr_b1", 12)])
def test_trains_and_detects_online(tmp_path: Path, model: str, epochs: int) -> None:
    data = make_features(tmp_path / "features.pkl")
    out, weights, scores = tmp_path / "result.json", tmp_path / "model.pt", tmp_path / "s.npz"
    result = _script().main(["--features", str(tmp_path / "features.pkl"), "--model", model,
                             "--epochs", str(epochs), *TINY, "--check", "--out", str(out),
                             "--save-model", str(weights), "--save-scores", str(scores)])
    assert json.loads(out.read_text())["map"] == result["map"]
    assert result["train_videos"] == 6 and result["test_videos"] == 2
    assert result["test_frames"] == sum(len(data[v]["anno"]) for v in data if "test" in v)
    labels = np.concatenate([data[v]["anno"] for v in sorted(data) if "test" in v])
    chance, _ = per_frame_map(np.random.default_rng(1).random(labels.shape), labels)
    assert chance < 0.2
    assert result["map"] > max(0.6, chance + 0.4), result
    assert result["losses"][-1] < result["losses"][0]
    assert result["ap_per_class"][0] is None  # background left out

    # online stepping equals the offline forward over the whole (start-padded) video
    net = create_model(model, **result["options"])
    net.load_state_dict(torch.load(weights, weights_only=True))
    stepped = np.load(scores)
    for name in (v for v in sorted(data) if "test" in v):
        x = torch.from_numpy(np.concatenate([data[name]["rgb"], data[name]["flow"]], 1)).t()
        with torch.no_grad():
            expected = net(pad_start(x, 8).unsqueeze(0))[0].t()
        assert expected.shape == (len(data[name]["anno"]), CLASSES)
        torch.testing.assert_close(torch.from_numpy(stepped[name]), expected,
                                   **tolerances(torch.float32))
    assert result["max_abs_diff_online_offline"] < 1e-4


def test_oadtr_baseline_runs(tmp_path: Path) -> None:
    make_features(tmp_path / "features.pkl")
    result = _script().main(["--features", str(tmp_path / "features.pkl"), "--model", "oadtr",
                             "--epochs", "1", *TINY, "--encoder-layers", "1",
                             "--decoder-layers", "1", "--queries", "2", "--check"])
    assert 0.0 < result["map"] <= 1.0
    assert result["max_abs_diff_online_offline"] < 1e-4


def test_split_file_and_bad_outputs(tmp_path: Path) -> None:
    make_features(tmp_path / "features.pkl")
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": ["video_validation_0"], "test": ["video_test_1"]}))
    script = _script()
    result = script.main(["--features", str(tmp_path / "features.pkl"), "--epochs", "1",
                          "--split", str(split), *TINY])
    assert result["train_videos"] == 1 and result["test_videos"] == 1
    with pytest.raises(SystemExit, match="multiple of the positional period"):
        script.main(["--features", str(tmp_path / "features.pkl"), "--epochs", "1",
                     "--outputs", "5", *TINY])
