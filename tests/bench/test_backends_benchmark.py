"""The step-backends benchmark runs end to end in its quick mode."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytest.importorskip("onnxruntime")
pytest.importorskip("openvino")


def test_backends_quick(tmp_path: Any) -> None:
    """The TCN through eager, onnxruntime and OpenVINO: outputs within 1e-4 of eager, a compute
    floor from MACs and a GEMM rate measured in the run, and the ceiling it implies."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "backends.py"), "--quick",
                           "--out", str(tmp_path)], capture_output=True, text=True,
                          timeout=300, check=False, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (r,) = json.loads((tmp_path / "backends_quick.json").read_text())["results"]
    assert r["workload"] == "tcn" and r["outputs_compared"] > 0
    assert set(r["step_ms"]) == {"eager", "onnxruntime", "openvino"}
    assert max(r["max_abs_diff"].values()) < 1e-4
    assert r["macs_per_step"] > 0 and r["peak_gemm_gmacs"] > 0
    assert r["operators_per_step"] > 0 and r["operator_bytes_per_step"] > 0
    floor = r["macs_per_step"] / (r["peak_gemm_gmacs"] * 1e6)
    assert r["compute_floor_ms"] == pytest.approx(floor)
    assert r["ceiling_over_eager"] == pytest.approx(r["step_ms"]["eager"] / floor)
    assert "| tcn | 1 |" in (tmp_path / "backends_quick.md").read_text()
