"""The decoder pruning study and the tiny-LLM training run end to end in their quick modes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[3]


def test_llm_pruning_quick(tmp_path: Any) -> None:
    script = ROOT / "benchmarks" / "llm_pruning.py"
    proc = subprocess.run([sys.executable, str(script), "--quick", "--quiet", "--cache",
                           str(tmp_path / "cache"), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((tmp_path / "llm_pruning_quick.json").read_text())
    train = report["train"]
    assert set(train["files"]) == {"train", "calibration", "heldout"}
    assert train["heldout_perplexity"] < train["unigram_perplexity"]
    methods = {r["method"] for r in report["rows"]}
    assert methods == {"magnitude", "magnitude g3", "taylor", "taylor+KL", "nirvana",
                       "nirvana+KL", "fluctuation", "magnitude g3 +heal", "taylor+KL +heal",
                       "nirvana+KL +heal"}
    for row in report["rows"]:
        assert row["removed"] >= 0.3 and row["decoder_params"] < report["decoder_params"]
        assert row["perplexity"] > 1.0
        assert min(row["kv_heads"]) >= 1
    assert {t["method"] for t in report["latency"]} == {"magnitude", "nirvana+KL"}
    assert all(t["pruned_tokens_per_s"] > 0 for t in report["latency"])
    assert report["verdict"]["holds"] in (True, False)
    table = (tmp_path / "llm_pruning_quick.md").read_text()
    assert "python benchmarks/llm_pruning.py --quick" in table and "## Verdict" in table
    assert (tmp_path / "llm_pruning_quick.png").read_bytes()[:4] == b"\x89PNG"
    # a second run loads the cached model instead of training again
    sys.path.insert(0, str(ROOT / "examples"))
    import train_tiny_llm as tiny

    path, info = tiny.load_or_train(tiny.QUICK, tmp_path / "cache", log=False)
    assert info == train and (path / "model.safetensors").is_file()
