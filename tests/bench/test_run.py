"""``run_bench``: every column, the exactness check, the writers and the plot."""

from __future__ import annotations

import csv
import io
import json
from typing import Any

import pytest
import torch
from torch import nn

import costream as cs
from costream.bench import (
    Workload,
    format_table,
    plot_bench,
    resolve_workload,
    run_bench,
    state_bytes,
    to_csv,
    to_json,
)
from costream.bench._report import COLUMNS
from costream.bench._workloads import BUILTIN_WORKLOADS, DEFAULT_MODELS
from costream.models import list_models


def _tiny() -> Workload:
    model = nn.Sequential(nn.Conv1d(4, 8, 3, padding=1), nn.ReLU(), nn.Conv1d(8, 3, 3)).eval()
    net = cs.continual(model).eval()
    return Workload("tiny", net, (4,), net.receptive_field,
                    resize=lambda frames: (net, frames), step_depends_on_window=True)


@pytest.fixture(scope="module")
def rows() -> list[dict[str, Any]]:
    torch.manual_seed(0)
    return run_bench([_tiny()], steps=5, progress=False, threads=1, window_factors=(1, 2))


def test_every_column_is_measured(rows):
    [row] = rows
    for _, key in COLUMNS:
        assert key in row, key
    assert row["params"] == 4 * 8 * 3 + 8 + 8 * 3 * 3 + 3
    assert row["receptive_field"] == 5 and row["clip_frames"] == 5
    assert row["clip_ms"] > 0 and row["step_ms"] > 0
    assert row["speedup"] == pytest.approx(row["clip_ms"] / row["step_ms"])
    assert row["mac_reduction"] == pytest.approx(row["macs_clip"] / row["macs_step"])
    assert row["threads"] == 1 and row["device"] == "cpu"


def test_macs_follow_the_ptflops_convention(rows):
    [row] = rows
    # clip of 5 frames, padding 1: conv1 5 outputs, ReLU 5, conv2 3 outputs (+ biases)
    assert row["macs_clip"] == 5 * 8 * 12 + 5 * 8 + 5 * 8 + 3 * 3 * 24 + 3 * 3
    # one step: each conv computes one output frame (k taps) and adds k - 1 partial sums
    assert 8 * 12 + 3 * 24 <= row["macs_step"] < row["macs_clip"]


def test_exactness_within_float32_tolerance(rows):
    [row] = rows
    assert row["exact"] is True
    assert row["max_abs_diff"] <= 1e-5
    assert row["outputs_compared"] >= 1 and row["stream_frames"] > row["receptive_field"]


def test_state_memory_is_the_partial_sums(rows):
    [row] = rows
    assert row["state_bytes"] == (2 * 8 + 2 * 3) * 4  # k - 1 partial sums per conv, float32


def test_window_sweep(rows):
    [row] = rows
    assert [w["frames"] for w in row["windows"]] == [5, 10]
    assert all(w["clip_ms"] > 0 and w["step_ms"] > 0 for w in row["windows"])


def test_table_has_every_column(rows):
    table = format_table(rows)
    header, rule, line = table.splitlines()
    for title, _ in COLUMNS:
        assert title in header
    assert set(rule) <= {"|", "-"}
    assert line.startswith("| tiny") and line.split("|")[-2].strip().endswith(" ok")


def test_table_marks_inexact_rows(rows):
    bad = dict(rows[0], exact=False, max_abs_diff=0.5)
    assert "5.0e-01 FAIL" in format_table([bad])


def test_json_writer(rows, tmp_path):
    path = tmp_path / "bench.json"
    text = to_json(rows, path, command="costream bench tiny")
    doc = json.loads(path.read_text())
    assert json.loads(text) == doc
    assert doc["command"] == "costream bench tiny"
    assert doc["environment"]["torch"] == torch.__version__
    assert doc["results"][0]["model"] == "tiny"
    assert doc["results"][0]["exact"] is True


def test_csv_writer(rows, tmp_path):
    path = tmp_path / "bench.csv"
    to_csv(rows, path)
    records = list(csv.DictReader(io.StringIO(path.read_text())))
    assert len(records) == 1
    assert records[0]["model"] == "tiny"
    assert int(records[0]["macs_clip"]) == rows[0]["macs_clip"]
    assert records[0]["exact"] == "True"


def test_plot_file_created(rows, tmp_path):
    out = plot_bench(rows, tmp_path / "plots" / "bench.png")
    assert out.read_bytes()[:4] == b"\x89PNG"


def test_builtin_workloads_are_exact():
    rows = run_bench(["tcn", "transformer"], steps=3, progress=False, threads=1)
    assert [r["model"] for r in rows] == ["tcn", "transformer"]
    for row in rows:
        assert row["exact"], row
        assert row["macs_step"] < row["macs_clip"]
    tcn, transformer = rows
    # 10 unpadded convs over the 21-frame window compute 19 + 17 + ... + 1 = 100 frames
    assert tcn["mac_reduction"] == pytest.approx(10.0, rel=0.02)
    # torch's fused inference path is not counted: the offline clip runs with autograd on
    assert transformer["macs_clip"] > 64 * 2 * 2 * 512 * 1024


def test_zoo_model_at_a_small_frame_size():
    [row] = run_bench(["cox3d_xs"], steps=2, progress=False, threads=1,
                      frame_shape=(3, 32, 32))
    assert row["exact"] and row["receptive_field"] == 60
    assert row["mac_reduction"] > 1


def test_default_models_resolve():
    zoo = set(list_models())
    for name in DEFAULT_MODELS:
        assert name in BUILTIN_WORKLOADS or name in zoo, name
    w = resolve_workload("cox3d_s")
    assert w.frame_shape == (3, 160, 160) and w.clip_length == 13
    assert w.net.temporal.stride == 1


def test_state_bytes_without_stream():
    assert state_bytes(cs.Conv1d(2, 2, 3)) == 0


def test_errors():
    with pytest.raises(KeyError, match="unknown model"):
        resolve_workload("no_such_model")
    with pytest.raises(ValueError, match="offline model"):
        resolve_workload("x3d_xs")
    with pytest.raises(ValueError, match="batch_size"):
        run_bench([_tiny()], batch_size=0, progress=False)
