"""``examples/stream_video.py`` streams a video it can decode and prints per-frame top-5 labels."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType

import av
import numpy as np
import pytest
import torch

from costream.models import kinetics400_classes

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "stream_video.py"


@pytest.fixture(scope="module")
def example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("stream_video", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def keep_threads():
    threads = torch.get_num_threads()  # the example sets its own thread count
    yield
    torch.set_num_threads(threads)


def write_video(path: Path, frames: int, width: int = 64, height: int = 48) -> None:
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=25)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        ramp = np.linspace(0, 255, width, dtype=np.float32)
        for t in range(frames):
            rgb = np.empty((height, width, 3), dtype=np.uint8)
            rgb[..., 0] = (ramp + 8 * t) % 256
            rgb[..., 1] = ramp[::-1]
            rgb[..., 2] = 4 * t % 256
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def test_streams_a_video_and_prints_top5_per_frame(example: ModuleType, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    video = tmp_path / "clip.mp4"
    write_video(video, frames=33)
    code = example.main(["--model", "cox3d_xs", "--video", str(video), "--head-pool", "2",
                         "--crop-size", "32"])
    assert code == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("cox3d_xs: first prediction after 30 frames")
    frame_lines = lines[1:]
    assert len(frame_lines) == 33  # every decoded frame is reported
    assert all("(warming up)" in line for line in frame_lines[:29])
    names = set(kinetics400_classes())
    for i, line in enumerate(frame_lines[29:], start=29):
        match = re.match(rf"frame\s+{i}\s+([\d.]+) ms  (.*)$", line)
        assert match, line
        assert float(match.group(1)) > 0
        top5 = re.findall(r"(.+?) \((0\.\d{3}|1\.000)\)(?:  |$)", match.group(2))
        assert len(top5) == 5 and all(label in names for label, _ in top5)
        probs = [float(p) for _, p in top5]
        assert probs == sorted(probs, reverse=True)


def test_reports_a_missing_pyav(example: ModuleType, tmp_path: Path,
                                capsys: pytest.CaptureFixture,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "av", None)  # import av raises ImportError
    assert example.main(["--video", str(tmp_path / "none.mp4")]) == 2
    assert "pip install av" in capsys.readouterr().err


def test_refuses_an_offline_model(example: ModuleType, tmp_path: Path,
                                  capsys: pytest.CaptureFixture) -> None:
    video = tmp_path / "clip.mp4"
    write_video(video, frames=2)
    assert example.main(["--model", "x3d_xs", "--video", str(video), "--crop-size", "32"]) == 2
    assert "cox3d_xs" in capsys.readouterr().err
