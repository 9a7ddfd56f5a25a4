"""THUMOS14-style feature pickles (safe loading, streams, training chunks) and per-frame mAP."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from costream.models import (
    ThumosFeatures,
    average_precision,
    load_thumos_features,
    pad_start,
    per_frame_map,
)


def features(lengths: dict[str, int], rgb: int = 3, flow: int = 2, classes: int = 4) -> dict:
    """Videos whose features encode (video number, frame index) and whose labels cycle."""
    data = {}
    for v, (name, t) in enumerate(lengths.items()):
        frames = np.arange(t, dtype=np.float32)
        data[name] = {
            "rgb": np.stack([frames + 1000 * v] * rgb, 1),
            "flow": -np.stack([frames + 1000 * v] * flow, 1),
            "anno": np.eye(classes, dtype=np.float32)[np.arange(t) % classes],
        }
    return data


# ---------------------------------------------------------------------- average precision
def test_average_precision_by_hand() -> None:
    # ranked: + - + - +  -> precisions at the positives 1, 2/3, 3/5
    ap = average_precision(np.array([0.9, 0.8, 0.7, 0.6, 0.5]), np.array([1, 0, 1, 0, 1]))
    assert ap == pytest.approx((1 + 2 / 3 + 3 / 5) / 3)
    assert average_precision(np.array([0.1, 0.9]), np.array([False, True])) == 1.0
    assert np.isnan(average_precision(np.array([0.3, 0.2]), np.array([0, 0])))


def test_tied_scores_count_as_one_threshold() -> None:
    # threshold 0.5 keeps one positive of two frames, 0.1 the second positive of three
    expected = 0.5 * (1 / 2) + 0.5 * (2 / 3)
    for order in ([0, 1, 2], [1, 0, 2]):
        scores = np.array([0.5, 0.5, 0.1])[order]
        positives = np.array([True, False, True])[order]
        assert average_precision(scores, positives) == pytest.approx(expected)


def test_average_precision_agrees_with_scikit_learn() -> None:
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    for _ in range(5):
        positives = rng.random(200) < 0.2
        scores = np.round(rng.random(200) + positives * 0.3, 1)  # many ties
        assert average_precision(scores, positives) == pytest.approx(
            metrics.average_precision_score(positives, scores))


def test_per_frame_map_by_hand() -> None:
    labels = np.zeros((4, 4))
    labels[[0, 1], 0] = 1  # background
    labels[2, 1] = labels[3, 1] = labels[3, 2] = 1  # frame 3 holds two actions
    scores = np.array([[.9, .0, .1, .0], [.1, .2, .3, .4], [.1, .8, .0, .1], [.2, .1, .2, .5]])
    m, aps = per_frame_map(torch.from_numpy(scores), torch.from_numpy(labels))
    # class 1: ranked f2 (+), f1, f3 (+) -> (1 + 2/3) / 2; class 2: f1 (0.3), f3 (+, 0.2) -> 1/2
    assert aps[1] == pytest.approx(5 / 6) and aps[2] == pytest.approx(1 / 2)
    assert np.isnan(aps[0]) and np.isnan(aps[3])  # background ignored, class 3 has no positives
    assert m == pytest.approx((5 / 6 + 1 / 2) / 2)
    m_all, aps_all = per_frame_map(scores, labels, ignore=())
    # class 0: f0 (+, 0.9), f3 (0.2), then f1 (+) tied with f2 at 0.1 -> 1/2 + 1/2 * 2/4
    assert aps_all[0] == pytest.approx(3 / 4)
    assert m_all == pytest.approx((3 / 4 + 5 / 6 + 1 / 2) / 3)
    with pytest.raises(ValueError, match="no class"):
        per_frame_map(scores, labels, ignore=(0, 1, 2))
    with pytest.raises(ValueError, match=r"\(N, K\)"):
        per_frame_map(scores[:, :3], labels)


# ---------------------------------------------------------------------- loading
class _Opens:
    """An object whose unpickling would call ``open(path, "w")``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def test_pickles_with_code_are_refused(tmp_path: Path) -> None:
    target = tmp_path / "created"
    raw = pickle.dumps({"v": {"rgb": _Opens(target)}})
    with pytest.raises(pickle.UnpicklingError, match=r"refusing to load io\.open"):
        load_thumos_features(raw)
    assert not target.exists()


def test_loads_paths_and_numpy1_pickles(tmp_path: Path) -> None:
    data = features({"a": 5, "b": 3})
    path = tmp_path / "f.pkl"
    path.write_bytes(pickle.dumps(data, protocol=5))
    loaded = load_thumos_features(path)
    np.testing.assert_array_equal(loaded["b"]["flow"], data["b"]["flow"])
    # numpy < 2 writes its reconstructors as ``numpy.core.multiarray``
    old = pickle.dumps(data, protocol=2).replace(b"cnumpy._core.multiarray\n",
                                                 b"cnumpy.core.multiarray\n")
    assert b"numpy.core.multiarray" in old
    np.testing.assert_array_equal(load_thumos_features(old)["a"]["anno"], data["a"]["anno"])


@pytest.mark.parametrize(("edit", "message"), [
    (lambda d: d["a"].pop("anno"), "'rgb', 'flow' and 'anno'"),
    (lambda d: d["a"].update(flow=d["a"]["flow"][:-1]), "same number of frames"),
    (lambda d: d["b"].update(rgb=d["b"]["rgb"][:, :2]), "widths"),
    (lambda d: d.clear(), "non-empty"),
])
def test_malformed_files_are_rejected(edit, message: str) -> None:
    data = features({"a": 5, "b": 3})
    edit(data)
    with pytest.raises(ValueError, match=message):
        load_thumos_features(pickle.dumps(data))


# ---------------------------------------------------------------------- dataset
def test_videos_as_streams() -> None:
    data = features({"b": 4, "a": 6})
    ds = ThumosFeatures(pickle.dumps(data))
    assert ds.videos == ["a", "b"] and len(ds) == 2
    assert (ds.in_features, ds.num_classes) == (5, 4)
    x, y = ds[1]  # video "b", the first in the file: features 0..3 (rgb), -0..-3 (flow)
    expected = torch.tensor([[0, 1, 2, 3]] * 3 + [[0, -1, -2, -3]] * 2, dtype=torch.float32)
    torch.testing.assert_close(x, expected)
    torch.testing.assert_close(y, torch.eye(4))
    subset = ThumosFeatures(data, ["b"], dtype=torch.float64)
    assert subset.videos == ["b"] and subset[0][0].dtype == torch.float64
    with pytest.raises(KeyError, match="'c'"):
        ThumosFeatures(data, ["a", "c"])


def test_chunks_align_windows_with_labels() -> None:
    window, outputs = 3, 4
    data = features({"a": 6, "b": 9})
    ds = ThumosFeatures(data, ["a", "b"])
    xs, ys = ds.chunks(window, outputs)
    assert xs.shape == (2 + 3, 5, outputs + window - 1) and ys.shape == (5, outputs, 4)
    for chunk, (v, j) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1), (1, 2)]):
        x, y = ds[v]
        for i in range(outputs):
            frame = j * outputs + i  # the frame this output predicts
            last = xs[chunk, :, i + window - 1]  # the newest frame of its window
            if frame < x.shape[1]:
                torch.testing.assert_close(last, x[:, frame])
                torch.testing.assert_close(ys[chunk, i], y[frame])
                first = frame - window + 1
                earliest = xs[chunk, :, i]
                expected = x[:, first] if first >= 0 else torch.zeros(5)
                torch.testing.assert_close(earliest, expected)
            else:  # past the video's end: no label
                assert ys[chunk, i].sum() == 0
    with pytest.raises(ValueError, match="positive"):
        ds.chunks(0, 4)


def test_pad_start() -> None:
    x = torch.arange(6.0).view(2, 3)
    padded = pad_start(x, 4)
    assert padded.shape == (2, 6)
    assert padded[:, :3].abs().sum() == 0
    torch.testing.assert_close(padded[:, 3:], x)
    torch.testing.assert_close(pad_start(x, 1), x)
