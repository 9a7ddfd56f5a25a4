"""The moving-digits example runs end to end (quick mode): train, cache, stream, check, report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples" / "moving_digits.py"
sys.path.insert(0, str(ROOT / "examples"))

from _moving_digits_data import (  # noqa: E402
    CANVAS,
    NUM_CLASSES,
    clip_batch,
    describe_class,
    load_split,
    make_stream,
    render,
)


def _run(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(SCRIPT), "--quick", "--quiet", "--threads", "1",
           "--iterations", "3", "--steps", "200", "--cache", str(tmp_path / "cache"),
           "--out-dir", str(tmp_path / "out"), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)


def test_quick_run_end_to_end(tmp_path: Any) -> None:
    proc = _run(tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((tmp_path / "out" / "moving_digits_quick.json").read_text())
    online = result["online"]
    assert online["exact"] and online["same_predictions"]
    assert online["max_abs_diff"] < 1e-4
    assert online["outputs_compared"] == 200 - online["delay"]
    assert 0.0 <= online["accuracy_settled"] <= 100.0
    assert online["frames_settled"] > 0 and online["step_us"] > 0 and online["window_us"] > 0
    assert online["window_macs"] > online["step_macs"] > 0
    assert result["train"]["cached"] is None
    assert list((tmp_path / "cache").glob("moving_digits-*.pt"))
    table = (tmp_path / "out" / "moving_digits_quick.md").read_text()
    assert "python examples/moving_digits.py --quick" in table
    assert "online per-frame accuracy" in table

    again = _run(tmp_path)  # the cached weights are reused
    assert again.returncode == 0, again.stderr[-2000:]
    rerun = json.loads((tmp_path / "out" / "moving_digits_quick.json").read_text())
    assert rerun["train"]["cached"]
    assert rerun["online"]["accuracy_settled"] == online["accuracy_settled"]


def test_stream_segments_and_labels() -> None:
    _, test = load_split(0)
    stream = make_stream(test, 300, np.random.default_rng(0), segment=(20, 40))
    assert stream.video.shape == (1, 1, 300, CANVAS, CANVAS)
    assert stream.labels.shape == (300,)
    assert stream.changes[0] == 0
    lengths = np.diff([*stream.changes, 300])
    assert (lengths[:-1] >= 20).all() and (lengths <= 40).all()
    for a, b in zip(stream.changes[:-1], stream.changes[1:]):
        assert (stream.labels[a:b] == stream.labels[a]).all()
        assert stream.labels[b] != stream.labels[a]
    assert int(stream.labels.max()) < NUM_CLASSES


def test_clips_move_one_pixel_per_frame() -> None:
    train, _ = load_split(0)
    rng = np.random.default_rng(0)
    x, y = clip_batch(train, 4, 5, rng)
    assert x.shape == (4, 1, 5, CANVAS, CANVAS) and y.shape == (4,)
    assert describe_class(4 * 7 + 1) == "7 left"
    clean_rng = np.random.default_rng(1)
    frames = render(train.images[0], 0, 3, clean_rng, noise=0.0)  # moving right
    torch.testing.assert_close(torch.from_numpy(np.roll(frames[0], 1, axis=1)),
                               torch.from_numpy(frames[1]))
