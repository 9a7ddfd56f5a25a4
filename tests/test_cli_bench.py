"""The console script's bench, convert and info subcommands on tiny models."""

from __future__ import annotations

import csv
import io
import json
import sys

import pytest
import torch

from costream.bench import format_table, load_converted
from costream.cli import main

MODEL = '''
import torch
def build():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv3d(3, 8, 3, padding=1), torch.nn.ReLU(),
                               torch.nn.Conv3d(8, 4, (3, 1, 1), stride=(2, 1, 1)))
def build_1d():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv1d(5, 8, 3), torch.nn.ReLU(),
                               torch.nn.Conv1d(8, 2, 3, dilation=2))
def encoder(batch_first=True):
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=batch_first)
    return torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
def encoder_seq_first():
    return encoder(batch_first=False)
class Future(torch.nn.Module):
    def forward(self, x):
        return x.flip(2)
def not_streamable():
    return torch.nn.Sequential(torch.nn.Conv1d(2, 2, 3), Future())
'''


@pytest.fixture
def user_model(tmp_path, monkeypatch):
    (tmp_path / "bench_user_model.py").write_text(MODEL)
    monkeypatch.chdir(tmp_path)  # the working directory is importable
    yield "bench_user_model"
    sys.modules.pop("bench_user_model", None)


def test_bench_prints_the_table(user_model, tmp_path, capsys):
    args = ["bench", f"{user_model}:build", "--frame-shape", "3,8,8", "--steps", "4",
            "--threads", "1", "--no-progress", "--json", str(tmp_path / "r.json"),
            "--csv", str(tmp_path / "r.csv"), "--plot", str(tmp_path / "r.png")]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "| model" in out and "| build" in out and "MAC reduction" in out
    assert "all exact" in out
    doc = json.loads((tmp_path / "r.json").read_text())
    [row] = doc["results"]
    assert row["exact"] and row["stride"] == 2 and row["frame_shape"] == [3, 8, 8]
    assert doc["command"].startswith(f"costream bench {user_model}:build --frame-shape 3,8,8")
    [record] = csv.DictReader(io.StringIO((tmp_path / "r.csv").read_text()))
    assert record["model"] == "build"
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"


def test_bench_names_the_step_backend_and_checks_its_outputs(user_model, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    args = ["bench", f"{user_model}:build_1d", "--frame-shape", "5", "--steps", "4",
            "--threads", "1", "--no-progress", "--backend", "onnxruntime",
            "--markdown", str(tmp_path / "r.md")]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "float32, steps by onnxruntime" in out and "all exact" in out
    assert "steps by onnxruntime" in (tmp_path / "r.md").read_text()


def test_the_table_shows_the_larger_of_the_eager_and_backend_differences():
    row = {"model": "m", "params": 1, "clip_frames": 3, "macs_clip": 1, "macs_step": 1,
           "mac_reduction": 1.0, "clip_ms": 1.0, "step_ms": 1.0, "speedup": 1.0,
           "state_bytes": 1, "max_abs_diff": 1e-7, "exact": False, "backend": "openvino",
           "backend_max_abs_diff": 3e-3}
    assert "3.0e-03 FAIL" in format_table([row])


def test_bench_json_and_csv_to_stdout(user_model, capsys):
    assert main(["bench", f"{user_model}:build_1d", "--steps", "3", "--threads", "1",
                 "--no-progress", "--json", "-"]) == 0
    doc = json.loads(capsys.readouterr().out)
    [row] = doc["results"]
    assert row["receptive_field"] == 7 and row["frame_shape"] == [5]
    assert main(["bench", f"{user_model}:build_1d", "--steps", "3", "--threads", "1",
                 "--no-progress", "--csv", "-"]) == 0
    [record] = csv.DictReader(io.StringIO(capsys.readouterr().out))
    assert record["exact"] == "True"


def test_convert_verify_save_and_load(user_model, tmp_path, capsys):
    out = tmp_path / "models" / "co.pt"
    assert main(["convert", f"{user_model}:build", "--frame-shape", "3,8,8",
                 "--out", str(out)]) == 0
    assert "OK:" in capsys.readouterr().out
    spec = json.loads((tmp_path / "models" / "co.pt.json").read_text())
    assert spec["source"] == f"{user_model}:build"
    assert spec["frame_shape"] == [3, 8, 8]
    assert (spec["receptive_field"], spec["delay"], spec["stride"]) == (5, 3, 2)
    assert spec["verified"]["max_abs_diff"] <= 1e-5

    net, loaded_spec = load_converted(out, trust=True)
    assert loaded_spec == spec
    source = sys.modules[user_model].build().eval()
    x = torch.randn(1, 3, 9, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(net.forward_steps(x, pad_end=True), source(x),
                                   rtol=1e-4, atol=1e-5)

    assert main(["info", str(out), "--trust"]) == 0
    text = capsys.readouterr().out
    assert "receptive field  5 frames" in text and "stride           2" in text


def test_convert_reports_what_cannot_stream(user_model, tmp_path, capsys):
    out = tmp_path / "bad.pt"
    assert main(["convert", f"{user_model}:not_streamable", "--frame-shape", "2",
                 "--out", str(out)]) == 1
    assert "FAIL" in capsys.readouterr().out
    assert not out.exists()


def test_info_of_a_zoo_model_as_json(capsys):
    assert main(["info", "cox3d_xs", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["receptive_field"] == 60 and info["stride"] == 1
    assert info["frame_shape"] == [3, 160, 160]
    assert info["state"] and all(len(t["shape"]) >= 2 for t in info["state"])
    assert info["state_bytes"] == sum(t["bytes"] for t in info["state"])


def test_info_of_a_builtin_workload(capsys):
    assert main(["info", "tcn"]) == 0
    text = capsys.readouterr().out
    assert "receptive field  21 frames" in text
    assert "delay            20 steps" in text
    assert "10 tensors" in text


def test_bench_unknown_model_fails(capsys):
    assert main(["bench", "no_such_model", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("costream bench: error: unknown model 'no_such_model'")


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("builder", ["encoder", "encoder_seq_first"])
def test_convert_transformer_encoder_with_a_window(user_model, builder, tmp_path, capsys):
    out = tmp_path / f"{builder}.pt"
    assert main(["convert", f"{user_model}:{builder}", "--frame-shape", "8",
                 "--temporal-window", "4", "--out", str(out)]) == 0, capsys.readouterr().out
    assert "OK:" in capsys.readouterr().out
    net, spec = load_converted(out, trust=True)
    assert spec["options"] == {"temporal_window": 4}
    # reference: the torch encoder on every window of 4 tokens, newest token's output
    source = getattr(sys.modules[user_model], builder)().eval()
    x = torch.randn(2, 8, 9)
    windows = x.unfold(2, 4, 1).permute(0, 2, 3, 1).reshape(-1, 4, 8)  # (B * 6, 4, d)
    with torch.no_grad():
        if builder == "encoder":
            expected = source(windows)[:, -1]
        else:
            expected = source(windows.transpose(0, 1))[-1]
        got = net.forward_steps(x)
    torch.testing.assert_close(got, expected.reshape(2, 6, 8).transpose(1, 2),
                               rtol=1e-4, atol=1e-5)


def test_bench_takes_a_temporal_window(user_model, capsys):
    assert main(["bench", f"{user_model}:encoder", "--frame-shape", "8", "--temporal-window",
                 "5", "--steps", "3", "--threads", "1", "--no-progress", "--json", "-"]) == 0
    [row] = json.loads(capsys.readouterr().out)["results"]
    assert row["receptive_field"] == 5 and row["exact"]
