"""Stream-state checkpoints: kill-and-resume, refusal of corrupt or mismatched files."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from unittest import mock

import pytest
import torch

import costream as cs
from costream.runtime import StreamEngine, load_engine, load_stream, save_engine, save_stream

SCRIPT = textwrap.dedent("""
    import sys, torch, costream as cs
    from costream.runtime import StreamEngine, save_engine, load_engine
    torch.manual_seed(0)
    net = cs.Sequential(cs.Conv1d(3, 5, 3, padding=1), torch.nn.ReLU(),
                        cs.Residual(cs.Conv1d(5, 5, 3)), cs.MaxPool1d(2, stride=1)).eval()
    frames = torch.randn(40, 4, 3, generator=torch.Generator().manual_seed(1))
    engine = StreamEngine(net, capacity=4, frame_shape=(3,))
    mode, path, out, cut = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    if mode == "resume":
        load_engine(engine, path)
        steps = range(cut, 40)
    else:
        for _ in range(4):
            engine.open()
        steps = range(0, cut if mode == "save" else 40)
    ys = []
    with torch.no_grad():
        for t in steps:
            o = engine.step({i: frames[t, i] for i in range(4)})
            ys.append(torch.stack([o[i] if o[i] is not None else torch.full((5,), float("nan"))
                                   for i in range(4)]))
    if mode == "save":
        save_engine(engine, path)
    torch.save(torch.stack(ys), out)
""")


def _run(tmp_path, *args):
    script = tmp_path / "job.py"
    script.write_text(SCRIPT)
    subprocess.run([sys.executable, str(script), *map(str, args)], check=True)


def _run_here(*args):
    """The job in this process: the uninterrupted reference needs no process of its own."""
    with mock.patch.object(sys, "argv", ["job.py", *map(str, args)]):
        exec(compile(SCRIPT, "job.py", "exec"), {"__name__": "__main__"})


def test_kill_and_resume_in_a_new_process_is_bit_identical(tmp_path):
    ckpt, cut = tmp_path / "streams.pt", 17
    _run_here("full", ckpt, tmp_path / "full.pt", cut)
    _run(tmp_path, "save", ckpt, tmp_path / "first.pt", cut)
    _run(tmp_path, "resume", ckpt, tmp_path / "rest.pt", cut)
    full = torch.load(tmp_path / "full.pt")
    resumed = torch.cat([torch.load(tmp_path / "first.pt"), torch.load(tmp_path / "rest.pt")])
    assert torch.equal(full.nan_to_num(7.0), resumed.nan_to_num(7.0))


def _engine() -> StreamEngine:
    net = cs.Sequential(cs.Conv1d(3, 5, 3, padding=1), cs.Conv1d(5, 2, 3))
    engine = StreamEngine(net, capacity=3, frame_shape=(3,))
    engine.open()
    engine.step({0: torch.randn(3)})
    return engine


def test_corrupt_file_is_refused_and_nothing_applied(tmp_path):
    engine = _engine()
    path = tmp_path / "s.pt"
    save_engine(engine, path)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    other = _engine()
    before = other.state_dict()
    with pytest.raises(ValueError, match="corrupt"):
        load_engine(other, path)
    after = other.state_dict()
    assert before["age"] == after["age"]
    assert all(torch.equal(a, b) for a, b in zip(before["tree"][0]["psum"],
                                                  after["tree"][0]["psum"], strict=True))


def test_mismatched_module_is_refused(tmp_path):
    path = tmp_path / "s.pt"
    save_engine(_engine(), path)
    wider = StreamEngine(cs.Sequential(cs.Conv1d(3, 6, 3, padding=1), cs.Conv1d(6, 2, 3)),
                         capacity=3, frame_shape=(3,))
    with pytest.raises(ValueError, match="different module"):
        load_engine(wider, path)
    with pytest.raises(ValueError, match="capacity"):
        load_engine(StreamEngine(_engine().module, capacity=2, frame_shape=(3,)), path)


def test_single_module_stream_round_trip(tmp_path):
    torch.manual_seed(0)
    net = cs.Sequential(cs.Conv1d(2, 4, 3, padding=1), cs.Delay(2), cs.AvgPool1d(2, stride=1))
    x = torch.randn(3, 2, 20)
    full = [net.forward_step(x[:, :, t]) for t in range(20)]
    net.reset_state()
    for t in range(9):
        net.forward_step(x[:, :, t])
    save_stream(net, tmp_path / "m.pt")
    fresh = cs.Sequential(cs.Conv1d(2, 4, 3, padding=1), cs.Delay(2), cs.AvgPool1d(2, stride=1))
    fresh.load_state_dict(net.state_dict())
    load_stream(fresh, tmp_path / "m.pt")
    for t in range(9, 20):
        assert torch.equal(fresh.forward_step(x[:, :, t]), full[t])
    with pytest.raises(ValueError, match="engine"):
        load_engine(_engine(), tmp_path / "m.pt")
