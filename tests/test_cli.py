"""The console script: demo, export and verify."""

from __future__ import annotations

import sys

import pytest

from costream.cli import main

MODEL = '''
import torch
def build():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv1d(3, 8, 3, stride=2, padding=1), torch.nn.ReLU(),
                               torch.nn.Conv1d(8, 4, 3))
'''


@pytest.fixture
def user_model(tmp_path, monkeypatch):
    """``user_model:build`` in the working directory, as docs/cli.md describes (not on
    sys.path: the console script must find it there)."""
    (tmp_path / "user_model.py").write_text(MODEL)
    monkeypatch.chdir(tmp_path)
    yield "user_model:build"
    sys.modules.pop("user_model", None)


def test_export_then_verify(tmp_path, user_model, capsys):
    out = tmp_path / "m.onnx"
    assert main(["export", user_model, "--onnx", str(out), "--frame-shape", "3"]) == 0
    assert out.exists() and (tmp_path / "m.onnx.json").exists()
    assert main(["verify", str(out), user_model]) == 0
    assert "OK:" in capsys.readouterr().out


def test_demo_runs(capsys):
    assert main(["demo", "--frames", "24"]) == 0
    assert "max |step - offline|" in capsys.readouterr().out


def test_unknown_subcommand_is_one_line_and_status_2(capsys):
    assert main(["no-such-command"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("costream: error: argument command")


def test_user_model_resolves_from_the_working_directory(user_model, tmp_path, capsys):
    import os

    assert str(tmp_path) not in sys.path and os.getcwd() not in sys.path
    assert main(["info", user_model, "--frame-shape", "3"]) == 0
    assert "receptive field  7 frames" in capsys.readouterr().out  # 3 + 2 * (3 - 1)
    assert os.getcwd() not in sys.path  # only while the model is imported
