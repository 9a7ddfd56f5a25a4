"""The ``costream prune`` subcommand (``add_arguments`` / ``run``)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from typing import Any

import pytest
import torch

from costream.prune._cli import add_arguments, run

MODEL_SOURCE = '''
import torch, costream as cs

def build():
    return cs.Sequential(cs.Conv3d(3, 16, 3, padding=1), torch.nn.BatchNorm3d(16),
                         torch.nn.ReLU(), cs.Conv3d(16, 4, (3, 1, 1)))
'''


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="costream prune")
    add_arguments(parser)
    return parser.parse_args(argv)


@pytest.fixture
def model_module(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> str:
    name = f"cli_model_{tmp_path.name}"
    (tmp_path / f"{name}.py").write_text(MODEL_SOURCE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    return name


@pytest.mark.parametrize("criterion, schedule, steps", [
    ("l1", "one-shot", 1), ("taylor", "cubic", 2)])
def test_prune_command_saves_a_smaller_model(model_module: str, tmp_path: Any, criterion: str,
                                             schedule: str, steps: int) -> None:
    out, report = tmp_path / "pruned.pt", tmp_path / "report.json"
    args = _parse([f"{model_module}:build", "--criterion", criterion, "--density", "0.5",
                   "--schedule", schedule, "--steps", str(steps),
                   "--example-input-shape", "1,3,6,8,8", "--out", str(out),
                   "--report", str(report)])
    assert run(args) == 0
    summary = json.loads(report.read_text())
    assert summary["after"]["params"] < summary["before"]["params"]
    assert summary["after"]["step_macs"] < summary["before"]["step_macs"]
    assert summary["channel_density"] == pytest.approx(0.5)
    model = torch.load(out, weights_only=False)
    assert model[0].out_channels == 8
    x = torch.randn(1, 3, 6, 8, 8)
    torch.testing.assert_close(model.forward_steps(x, pad_end=True), model(x), atol=1e-5,
                               rtol=1e-4)


def test_prune_command_reports_bad_arguments(model_module: str, tmp_path: Any,
                                             capsys: pytest.CaptureFixture) -> None:
    base = ["--example-input-shape", "1,3,6,8,8", "--out", str(tmp_path / "x.pt")]
    assert run(_parse(["no_colon", *base])) == 2
    assert "MODULE:FUNCTION" in capsys.readouterr().err
    assert run(_parse([f"{model_module}:missing", *base])) == 2
    bad_shape = _parse([f"{model_module}:build", "--example-input-shape", "1,a",
                        "--out", str(tmp_path / "x.pt")])
    assert run(bad_shape) == 2
    assert "comma-separated" in capsys.readouterr().err


def test_command_module_imports_without_pruning_dependencies() -> None:
    code = ("import sys, costream.prune._cli; "
            "sys.exit(1 if {'torch_pruning', 'safetensors'} & set(sys.modules) else 0)")
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
