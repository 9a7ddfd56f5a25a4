"""`costream listen` streams the committed demo WAV and prints its keywords as they are spoken."""

from __future__ import annotations

import json
import time
import wave
from pathlib import Path

import numpy as np
import pytest

from costream.audio import listen, read_wav
from costream.cli import main

DATA = Path(__file__).resolve().parents[2] / "examples" / "data"
MODEL, WAV = DATA / "keyword_spotter.pt", DATA / "keywords.wav"


def test_listen_prints_the_spoken_keywords(capsys) -> None:
    truth = json.loads((DATA / "keywords.json").read_text())  # written by the data generator
    assert main(["listen", str(MODEL), "--wav", str(WAV), "--fast"]) == 0
    lines = capsys.readouterr().out.splitlines()
    hits = [line.split() for line in lines if " s  " in line]
    assert [h[2] for h in hits] == truth["keywords"]
    spoken = {e["word"]: e for e in truth["events"]}
    for h in hits:  # each detection between its word's start and 1 s after its end
        t, event = float(h[0]), spoken[h[2]]
        assert event["start"] <= t <= event["end"] + 1.0
    assert lines[-1].startswith(f"{len(hits)} detections in {truth['seconds']:.1f} s")


def _write(path: Path, pcm: np.ndarray, rate: int, channels: int = 1) -> None:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.astype("<i2").tobytes())


def test_real_time_pace_and_stereo(tmp_path) -> None:
    # stereo: channels are averaged (here +1/2 and -1/2 full scale: silence)
    pcm = np.tile(np.array([16384, -16384]), 8000)
    _write(tmp_path / "s.wav", pcm, 16000, channels=2)
    x, rate = read_wav(tmp_path / "s.wav")
    assert rate == 16000 and x.shape == (8000,) and not x.any()
    start = time.perf_counter()
    listen(MODEL, tmp_path / "s.wav", out=lambda m: None)
    assert time.perf_counter() - start >= 0.45  # 0.5 s of audio at real-time pace


def test_bad_files_are_one_line_errors(tmp_path) -> None:
    (tmp_path / "x.wav").write_text("not audio")
    with pytest.raises(SystemExit, match="not a PCM WAV"):
        read_wav(tmp_path / "x.wav")
    _write(tmp_path / "8k.wav", np.zeros(800), 8000)
    with pytest.raises(SystemExit, match="8000 Hz; the model expects 16000 Hz"):
        listen(MODEL, tmp_path / "8k.wav")
    with pytest.raises(SystemExit, match="no such WAV"):
        read_wav(tmp_path / "missing.wav")


def test_cli_user_errors_are_one_line_with_exit_2(tmp_path, capsys) -> None:
    for argv, message in ((["--wav", str(tmp_path / "missing.wav")], "no such WAV file"),
                          (["--wav", str(WAV), "--smooth", "0"], "--smooth must be at least")):
        assert main(["listen", str(MODEL), *argv, "--fast"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("costream listen: error: ")
        assert message in err
