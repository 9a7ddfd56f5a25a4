"""The keyword-spotting example: detection scoring, synthetic streams, a quick end-to-end run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

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


def test_spec_augment_masks_one_band_and_one_frame_range() -> None:
    rng = np.random.default_rng(0)
    feats = torch.randn(64, 40, 98, dtype=torch.float64)
    out = ks.spec_augment(feats, rng, p=1.0, bands=8, frames=10)
    assert out.shape == feats.shape and not torch.equal(out, feats)
    for x, y in zip(feats, out):
        changed = x != y
        rows, cols = changed.all(1), changed.all(0)  # a masked band / frame range: whole rows/cols
        assert rows.sum() <= 8 and cols.sum() <= 10
        assert torch.equal(changed, rows[:, None] | cols[None, :])
        assert torch.all(y[changed] == x.mean())  # filled with the clip's mean
    assert torch.equal(ks.spec_augment(feats, rng, p=0.0), feats)


def test_speed_perturbation_rescales_time_and_keeps_one_second_at_most() -> None:
    rng = np.random.default_rng(0)
    tone = np.sin(2 * np.pi * 440 * np.arange(8000) / SR).astype(np.float32)  # 0.5 s, 440 Hz
    assert kd.perturb_speed(tone, rng, None) is tone
    fast = kd.perturb_speed(tone, rng, (1.25, 1.25))
    assert len(fast) == 6400 and fast.dtype == np.float32  # 1.25x faster: 0.4 s
    peak = np.argmax(np.abs(np.fft.rfft(fast))) * SR / len(fast)
    assert abs(peak - 550) < 5  # and 1.25x higher
    slow = kd.perturb_speed(np.ones(15000, np.float32), rng, (0.8, 0.8))
    assert len(slow) == SR  # 1.17 s at 0.8x: cut to the 1 s a clip holds


def test_detections_match_stepping_the_detector_with_smoothing() -> None:
    g = torch.Generator().manual_seed(0)
    probs = torch.rand(3000, len(kd.CLASSES), generator=g).mul(3).softmax(1)  # all < 0.5
    probs[1000:1060, 3] = 0.99
    probs[2000:2002, 5] = 0.99  # a two-hop spike: fires unsmoothed, averaged away over 20 hops
    for smooth in (1, 20):
        det = ks.detector(list(range(len(kd.KEYWORDS))), 0.5, smooth)
        stepped = [(7 + t, k) for t, row in enumerate(probs) for k in det.update(row)]
        assert any(k == 3 and 7 + 1000 <= t < 7 + 1060 for t, k in stepped)  # the burst fires
        assert any(k == 5 and 7 + 2000 <= t < 7 + 2002 for t, k in stepped) == (smooth == 1)
        assert ks.detect(probs, list(range(len(kd.KEYWORDS))), 0.5, 7, smooth) == stepped
