"""Every user error of the console script is one line on stderr and exit status 2.

Run in-process through ``costream.cli.main``; the tiny model lives in the working directory,
which the console script must be able to import from. Its builder leaves a marker file, so a
test can tell that an output path was refused before any model was built.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from costream._cli_util import UsageError
from costream.cli import main

MODEL = '''
from pathlib import Path
import torch
def build():
    Path("built.marker").touch()
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv1d(3, 4, 3), torch.nn.ReLU(), torch.nn.Conv1d(4, 2, 1))
NOT_A_FUNCTION = 3
'''


@pytest.fixture
def cwd_model(tmp_path, monkeypatch):
    (tmp_path / "err_model.py").write_text(MODEL)
    (tmp_path / "a_file").write_text("")
    monkeypatch.chdir(tmp_path)
    yield "err_model:build"
    sys.modules.pop("err_model", None)


BLOCKED = "a_file/out"  # below a regular file: not writable, whoever runs the test

CASES = {
    "unknown model": (["bench", "no_such_model"], "unknown model 'no_such_model'"),
    "module not found": (["bench", "no_such_module:build"], "no module named 'no_such_module'"),
    "function not found": (["bench", "err_model:nope"], "err_model has no attribute 'nope'"),
    "not a function": (["info", "err_model:NOT_A_FUNCTION"], "is a int, not a function"),
    "empty function": (["convert", "err_model:", "--out", "o.pt"], "package.module:function"),
    "frame shape syntax": (["bench", "err_model:build", "--frame-shape", "3,x"],
                           "argument --frame-shape: expected positive integers"),
    "frame shape channels": (["bench", "err_model:build", "--frame-shape", "5", "--steps", "2"],
                             "fails on frames of shape 5"),
    "convert frame shape": (["convert", "err_model:build", "--frame-shape", "5", "--out", "o.pt"],
                            "fails on frames of shape 5"),
    "info frame shape": (["info", "err_model:build", "--frame-shape", "3,8"],
                         "fails on frames of shape 3,8"),
    "steps 0": (["bench", "tcn", "--steps", "0"], "argument --steps: must be at least 1, got 0"),
    "threads 0": (["bench", "tcn", "--threads", "0"], "argument --threads: must be at least 1"),
    "unknown device": (["bench", "tcn", "--device", "tpu9"], "argument --device:"),
    "missing device": (["bench", "tcn", "--device", "cuda:99"], "argument --device: cuda:99"),
    "json path": (["bench", "err_model:build", "--json", f"{BLOCKED}/r.json"], "--json"),
    "csv path": (["bench", "err_model:build", "--csv", f"{BLOCKED}.csv"], "--csv"),
    "markdown path": (["bench", "err_model:build", "--markdown", "."], "is a directory"),
    "plot path": (["bench", "err_model:build", "--plot", f"{BLOCKED}.png"], "--plot"),
    "convert out": (["convert", "err_model:build", "--out", f"{BLOCKED}.pt"], "--out"),
    "export out": (["export", "err_model:build", "--frame-shape", "3", "--onnx",
                    f"{BLOCKED}.onnx"], "--onnx"),
    "prune out": (["prune", "err_model:build", "--example-input-shape", "1,3,8",
                   "--out", f"{BLOCKED}.pt"], "--out"),
    "verify missing file": (["verify", "no.onnx", "err_model:build"], "no.onnx.json"),
    "missing converted file": (["bench", "missing.pt"], "unknown model 'missing.pt'"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_user_error_is_one_line_and_status_2(name, cwd_model, capsys):
    argv, expected = CASES[name]
    assert main([*argv, *(["--no-progress"] if argv[0] == "bench" else [])]) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1, captured.err
    assert captured.err.startswith(f"costream {argv[0]}: error: ")
    assert expected in captured.err
    assert "Traceback" not in captured.err + captured.out
    if name.endswith(("path", "out")):
        assert not Path("built.marker").exists(), "the output path was checked after the run"


def test_debug_shows_the_traceback(cwd_model):
    with pytest.raises(UsageError, match="must be at least 1"):
        main(["--debug", "bench", "tcn", "--steps", "0"])
    with pytest.raises(UsageError) as info:
        main(["bench", "no_such_module:build", "--debug"])
    assert isinstance(info.value.__cause__, ModuleNotFoundError)
