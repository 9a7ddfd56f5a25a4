"""Files written by ``costream convert`` run no code unless trusted and cannot lie.

One conversion per module (a tiny Conv1d net from a builder in the working directory); each test
edits a copy of the pair ``model.pt`` / ``model.pt.json``. The builder leaves a marker file when
it runs, so a test can tell whether loading ran it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from costream.bench import load_converted
from costream.bench._converted import ConvertedFileError
from costream.bench._workloads import import_builder
from costream.cli import main

SOURCE = '''
from pathlib import Path
import torch
def build():
    Path("built.marker").touch()
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv1d(3, 6, 3), torch.nn.ReLU(), torch.nn.Conv1d(6, 2, 1))
def build_tanh():  # the same shapes, another network
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv1d(3, 6, 3), torch.nn.Tanh(), torch.nn.Conv1d(6, 2, 1))
'''


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("converted")
    (root / "conv_src.py").write_text(SOURCE)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        assert main(["convert", "conv_src:build", "--frame-shape", "3", "--out", "net.pt"]) == 0
        yield root
    sys.modules.pop("conv_src", None)


@pytest.fixture
def pair(converted: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh copy of the converted pair in a working directory with the builder."""
    for name in ("conv_src.py", "net.pt", "net.pt.json"):
        shutil.copy(converted / name, tmp_path / name)
    monkeypatch.chdir(tmp_path)
    sys.modules.pop("conv_src", None)
    return tmp_path / "net.pt"


def _spec(path: Path) -> dict:
    return json.loads(Path(f"{path}.json").read_text())


def _write_spec(path: Path, spec: dict, *, rehash: bool = False) -> None:
    if rehash:  # an edit that also recomputes the spec checksum
        body = {k: v for k, v in spec.items() if k != "spec_sha256"}
        spec["spec_sha256"] = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
    Path(f"{path}.json").write_text(json.dumps(spec))


def test_loading_runs_no_code_unless_trusted(pair: Path, capsys) -> None:
    with pytest.raises(ConvertedFileError, match=r"names the builder 'conv_src:build'.*trust"):
        load_converted(pair)
    assert main(["info", str(pair)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--trust" in err
    assert not Path("built.marker").exists()
    load_converted(pair, trust=True)
    assert Path("built.marker").exists()
    assert main(["info", str(pair), "--trust"]) == 0


def test_explicit_builder_loads_the_saved_weights(pair: Path) -> None:
    build = import_builder("conv_src:build")
    net, spec = load_converted(pair, build)
    x = torch.randn(2, 3, 9)
    state = torch.load(pair, weights_only=True)
    torch.testing.assert_close(net.state_dict()["0.weight"], state["0.weight"])
    with torch.no_grad():
        torch.testing.assert_close(net.forward_steps(x, pad_end=True), build().eval()(x))
    assert spec["source"] == "conv_src:build"


def test_truncated_json_is_refused(pair: Path, capsys) -> None:
    text = Path(f"{pair}.json").read_text()
    Path(f"{pair}.json").write_text(text[: len(text) // 2])
    with pytest.raises(ConvertedFileError, match="not valid JSON"):
        load_converted(pair, trust=True)
    assert main(["info", str(pair), "--trust"]) == 2
    assert "not valid JSON" in capsys.readouterr().err


@pytest.mark.parametrize(("field", "value"), [("source", "conv_src:build_tanh"),
                                              ("options", {"temporal_window": 3}),
                                              ("frame_shape", [4])])
def test_edited_json_is_refused(pair: Path, field: str, value) -> None:
    spec = _spec(pair)
    spec[field] = value
    _write_spec(pair, spec)
    with pytest.raises(ConvertedFileError, match="spec checksum mismatch"):
        load_converted(pair, trust=True)


def test_truncated_weights_are_refused(pair: Path) -> None:
    data = pair.read_bytes()
    pair.write_bytes(data[: len(data) - 100])
    with pytest.raises(ConvertedFileError, match="weights checksum mismatch"):
        load_converted(pair, trust=True)


def test_same_shaped_other_model_is_refused(pair: Path) -> None:
    build_tanh = import_builder("conv_src:build_tanh")
    with pytest.raises(ConvertedFileError, match="another structure"):
        load_converted(pair, build_tanh)
    spec = _spec(pair)
    spec["source"] = "conv_src:build_tanh"
    _write_spec(pair, spec, rehash=True)
    with pytest.raises(ConvertedFileError, match="another structure"):
        load_converted(pair, trust=True)
