"""The SPA digits study runs end to end in its quick mode and writes table, JSON and plot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def test_spa_digits_quick(tmp_path: Any) -> None:
    script = ROOT / "examples" / "spa_digits.py"
    proc = subprocess.run([sys.executable, str(script), "--quick", "--quiet", "--out-dir",
                           str(tmp_path)], capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((tmp_path / "spa_digits.json").read_text())
    methods = {(r["method"], r["density"]) for r in result["summary"]}
    assert methods == {("full-ft", 1.0), ("splora", 1.0), ("sppara", 1.0),
                       ("fine-pruning", 0.3), ("splora", 0.3), ("sppara", 0.3)}
    for row in result["summary"]:
        assert 0.0 <= row["accuracy_mean"] <= 100.0
        assert row["learned_params"] > 0 and row["macs"] > 0
        pruned = row["density"] < 1.0
        assert (row["mask_bits"] > 0) == pruned
        assert (row["macs"] < result["base"]["macs"]) == pruned
    by = {(r["method"], r["density"]): r for r in result["summary"]}
    assert by[("splora", 0.3)]["learned_params"] < by[("fine-pruning", 0.3)]["learned_params"]
    assert by[("full-ft", 1.0)]["learned_params"] == result["base"]["params"]
    assert result["verdict"]["holds"] in (True, False)
    table = (tmp_path / "spa_digits.md").read_text()
    assert "python examples/spa_digits.py --quick" in table
    assert "| method | density | rank | accuracy (%)" in table
    assert ("REPRODUCED" in table) and "## Verdict" in table
    assert (tmp_path / "spa_digits.png").read_bytes()[:4] == b"\x89PNG"
