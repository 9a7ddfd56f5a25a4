"""The sweep benchmark runs end to end in its quick mode."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytest.importorskip("continual")


def test_sweep_quick(tmp_path: Any) -> None:
    """Three tiny workloads (one per family), 1 thread, eager only: every row checked
    against the anchor, with ratios, MACs, GMAC/s and a roofline floor from peaks measured
    in the run."""
    script = ROOT / "benchmarks" / "sweep.py"
    proc = subprocess.run([sys.executable, str(script), "--quick", "--backends", "--out",
                           str(tmp_path)], capture_output=True, text=True, timeout=300,
                          check=False, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((tmp_path / "sweep_quick.json").read_text())
    assert [r["family"] for r in report["rows"]] == ["tcn", "cnn3d", "transformer"]
    peak = report["peaks"]["1"]
    assert peak["gemm_gmacs"] > 0 and peak["bandwidth_gbs"] > 0
    for row in report["rows"]:
        assert row["check"]["equals_anchor"] and row["check"]["compared_outputs"] > 0
        res = row["timing"]["1"]
        assert set(res["latency_us"]) == {"costream", "anchor", "window"}
        assert res["best_backend"] == "costream"
        ratio = res["latency_us"]["anchor"] / res["latency_us"]["costream"]
        assert res["anchor_over_costream"] == pytest.approx(ratio)
        assert row["static"]["macs"] > 0 and 0 < res["floor_fraction"]
        assert res["floor_us"] * 1e3 >= row["static"]["macs"] / peak["gemm_gmacs"] * (1 - 1e-9)
        assert res["ceiling"] == pytest.approx(res["latency_us"]["anchor"] / res["floor_us"])
        # the skeleton (same layers, 4 channels) is timed, and named where a step is far
        # from its floor (tiny workloads always are)
        assert res["skeleton_us"] > 0
        assert res["skeleton_fraction"] == pytest.approx(res["skeleton_us"] / res["latency_us"][
            res["best_backend"]])
        assert res["floor_fraction"] < 0.25
    assert set(report["summary"]) == {"tcn/1", "cnn3d/1", "transformer/1"}
    table = (tmp_path / "sweep_quick.md").read_text()
    assert "python benchmarks/sweep.py --quick" in table and "| trf_tiny | 1 |" in table
    below = table.split("## Steps below 25 % of their roofline floor")[1].split("## Workloads")[0]
    assert all(f"- `{name}`, 1 thread(s)" in below for name in ("tcn_tiny", "cnn_tiny",
                                                               "trf_tiny"))

    # --rerender recomputes the derived columns from the recorded measurements alone
    report["notes"] = ["a note kept across re-rendering"]
    for row in report["rows"]:
        del row["timing"]["1"]["ceiling"]
    (tmp_path / "sweep_quick.json").write_text(json.dumps(report))
    proc = subprocess.run([sys.executable, str(script), "--rerender",
                           str(tmp_path / "sweep_quick.json")], capture_output=True, text=True,
                          timeout=120, check=False, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    again = json.loads((tmp_path / "sweep_quick.json").read_text())
    for row in again["rows"]:
        res = row["timing"]["1"]
        assert res["ceiling"] == pytest.approx(res["latency_us"]["anchor"] / res["floor_us"])
    assert "a note kept across re-rendering" in (tmp_path / "sweep_quick.md").read_text()


def test_sweep_only_selects_workloads_and_refuses_unknown_names() -> None:
    """``--only`` keeps the named workloads or families; an unknown name is a usage error
    (exit 2, one line naming it) before anything is built."""
    script = ROOT / "benchmarks" / "sweep.py"
    proc = subprocess.run([sys.executable, str(script), "--quick", "--check-only", "--only",
                           "transformer"], capture_output=True, text=True, timeout=300,
                          check=False, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    built = [line.split("]")[0][1:] for line in proc.stdout.splitlines() if line.startswith("[")]
    assert built == ["trf_tiny"]
    proc = subprocess.run([sys.executable, str(script), "--only", "cnn99"], capture_output=True,
                          text=True, timeout=120, check=False, cwd=ROOT)
    assert proc.returncode == 2
    error = [line for line in proc.stderr.splitlines() if "error" in line]
    assert len(error) == 1 and "cnn99" in error[0] and "cnn12" in error[0]
    assert "Traceback" not in proc.stderr
