"""The keyword-spotting example: detection scoring, synthetic streams, a quick end-to-end run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples" / "keyword_spotting.py"
sys.path.insert(0, str(ROOT / "examples"))

import _keyword_data as kd  # noqa: E402
import keyword_spotting as ks  # noqa: E402

SR, HOP = kd.SAMPLE_RATE, ks.FRONT["hop_length"]


def _stream(events: list[tuple[float, float, int]], seconds: float = 60.0) -> kd.Stream:
    return kd.Stream(np.zeros(int(seconds * SR), np.float32),
                     np.array([int(s * SR) for s, _, _ in events]),
                     np.array([int(e * SR) for _, e, _ in events]),
                     np.array([c for _, _, c in events]), np.zeros(len(events)))


def _hop_at(seconds: float) -> int:
    return round(seconds * SR / HOP) - 1  # the hop whose last sample is at `seconds`


def test_evaluate_matches_detections_to_keywords() -> None:
    yes, no = kd.KEYWORDS.index("yes"), kd.KEYWORDS.index("no")
    stream = _stream([(1.0, 1.5, yes), (5.0, 5.4, no), (10.0, 10.5, kd.UNKNOWN),
                      (20.0, 20.5, yes)])
    detections = [(_hop_at(1.4), yes),    # during "yes": a hit
                  (_hop_at(2.3), yes),    # the same "yes" again: already matched, false alarm
                  (_hop_at(6.3), no),     # 0.9 s after "no" ended: a hit
                  (_hop_at(10.5), no),    # on an unknown word: false alarm
                  (_hop_at(22.0), yes)]   # 1.5 s after the second "yes": too late
    r = ks.evaluate(stream, detections)
    assert r["keywords"] == 3
    assert r["per_keyword"]["yes"] == {"occurrences": 2, "detected": 1, "false_alarms": 2,
                                       "recall": 0.5, "precision": 1 / 3}
    assert r["per_keyword"]["no"]["detected"] == 1 and r["per_keyword"]["no"]["false_alarms"] == 1
    assert r["recall"] == pytest.approx(2 / 3) and r["precision"] == pytest.approx(2 / 5)
    hours = (60.0 - 0.5 - 0.4 - 0.5) / 3600  # everything but the keywords
    assert r["false_alarms_per_hour"] == pytest.approx(3 / hours, rel=1e-4)


def test_stream_places_words_without_overlap() -> None:
    rng = np.random.default_rng(0)
    fake = kd.Utterances([rng.standard_normal(4000).astype(np.float32) * 0.1 for _ in range(22)],
                         np.array(list(range(11)) * 2), ["w"] * 22, ["v"] * 22)
    s = kd.make_stream(fake, 30.0, rng)
    assert len(s.audio) == 30 * SR and np.abs(s.audio).max() <= 0.99 + 1e-6
    assert len(s.starts) > 5 and np.all(s.starts[1:] >= s.ends[:-1] + SR)  # gaps >= 1 s
    assert set(s.labels) <= set(range(kd.UNKNOWN + 1))


@pytest.mark.skipif(not kd.have_espeak(), reason="needs espeak-ng (apt-get install espeak-ng)")
def test_quick_run_end_to_end(tmp_path) -> None:
    cmd = [sys.executable, str(SCRIPT), "--quick", "--quiet", "--cache", str(tmp_path / "c"),
           "--out-dir", str(tmp_path / "out")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads((tmp_path / "out" / "keyword_spotting_quick.json").read_text())
    assert r["exactness"]["max_abs_logit_diff"] < 1e-3  # stepped vs offline, float32
    assert r["exactness"]["frames"] == r["speed"]["hops"] - 99  # every due hop compared
    assert r["speed"]["step_cpu_ms"] > 0 and r["speed"]["recompute_cpu_ms"] > 0
    assert set(r["test"]["per_keyword"]) == set(kd.KEYWORDS)
    for suffix in ("md", "png"):
        assert (tmp_path / "out" / f"keyword_spotting_quick.{suffix}").stat().st_size > 0
    assert (tmp_path / "out" / "keyword_spotter_quick.pt").exists()
