"""Graph conversion overhead: the step of a traced model against the same network built by hand.

Two workloads, each written twice with the same weights:

* ``traced``: a plain ``torch.nn.Module`` with a custom ``forward`` (residual blocks written as
  ``x + f(x)``), converted by ``costream.continual(model, example=clip)`` into a
  :class:`costream.Graph`;
* ``hand``: the same network built from costream containers (``Sequential``, ``Residual``).

Workloads: a 4-block dilated TCN (64 channels, unpadded convs, the residual cropped to the
branch output), and a small residual 3D CNN (2 blocks of 3x3x3 convs with batch norm, 16
channels, 32x32 frames). Both are checked to step to the same outputs before timing. Steps are
timed in interleaved blocks (batch 1, float32, one thread, ``torch.inference_mode()``), after
warm-up; the report gives the median per-step latency of each and their ratio, and the CPU
other processes kept busy while timing (/proc/stat).

Usage::

    python benchmarks/graph_overhead.py            # writes benchmarks/results/graph_overhead.*
    python benchmarks/graph_overhead.py --quick    # smoke run (writes graph_overhead_quick.*)
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

import costream as cs

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import OtherLoad, machine, write_report


class TCNBlock(nn.Module):
    def __init__(self, c: int, d: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(c, c, 3, dilation=d)
        self.conv2 = nn.Conv1d(c, c, 3, dilation=d)
        self.crop = 4 * d

    def forward(self, x):
        h = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return torch.relu(h + x[:, :, self.crop:])


class TCN(nn.Module):
    def __init__(self, c: int = 64, blocks: int = 4) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(TCNBlock(c, 2 ** i) for i in range(blocks))

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x


def hand_tcn(model: TCN) -> cs.CoModule:
    blocks = []
    for b in model.blocks:
        branch = cs.Sequential(cs.continual(b.conv1), nn.ReLU(), cs.continual(b.conv2), nn.ReLU())
        blocks.append(cs.Sequential(cs.Residual(branch, align="end"), nn.ReLU()))
    return cs.Sequential(*blocks)


class Res3dBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv3d(c, c, 3, padding=1, bias=False), nn.BatchNorm3d(c)
        self.conv2, self.bn2 = nn.Conv3d(c, c, 3, padding=1, bias=False), nn.BatchNorm3d(c)

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(x + self.bn2(self.conv2(h)))


class Res3d(nn.Module):
    def __init__(self, c: int = 16) -> None:
        super().__init__()
        self.stem = nn.Conv3d(3, c, 3, padding=1)
        self.blocks = nn.Sequential(Res3dBlock(c), Res3dBlock(c))

    def forward(self, x):
        return self.blocks(torch.relu(self.stem(x)))


def hand_res3d(model: Res3d) -> cs.CoModule:
    blocks = []
    for b in model.blocks:
        branch = cs.Sequential(cs.continual(b.conv1), b.bn1, nn.ReLU(), cs.continual(b.conv2),
                               b.bn2)
        blocks.append(cs.Sequential(cs.Residual(branch), nn.ReLU()))
    return cs.Sequential(cs.continual(model.stem), nn.ReLU(), *blocks)


def workloads() -> dict:
    torch.manual_seed(0)
    tcn = TCN().eval()
    res = Res3d().eval()
    for m in res.modules():
        if isinstance(m, nn.BatchNorm3d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return {
        "tcn": (tcn, hand_tcn(tcn).eval(), torch.randn(1, 64, 64)),
        "res3d": (res, hand_res3d(res).eval(), torch.randn(1, 3, 8, 32, 32)),
    }


def time_steps(nets: dict, frames: torch.Tensor, repeats: int, block: int) -> dict:
    times: dict[str, list[float]] = {k: [] for k in nets}
    t = frames.shape[2]
    for net in nets.values():
        net.reset_state()
        for i in range(min(t, 60)):
            net.forward_step(frames[:, :, i % t])
    for r in range(repeats):
        order = list(nets.items()) if r % 2 == 0 else list(reversed(nets.items()))
        for name, net in order:
            for i in range(3):  # untimed warm-in
                net.forward_step(frames[:, :, i % t])
            start = time.perf_counter()
            for i in range(block):
                net.forward_step(frames[:, :, i % t])
            times[name].append((time.perf_counter() - start) / block)
    return times


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke run")
    p.add_argument("--repeats", type=int, default=60)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = p.parse_args(argv)
    repeats, block = (3, 5) if args.quick else (args.repeats, 20)
    torch.set_num_threads(1)
    rows = []
    load = OtherLoad()
    built = {name: (cs.continual(model, example=clip), hand, clip)
             for name, (model, hand, clip) in workloads().items()}
    with torch.inference_mode():
        for name, (traced, hand, clip) in built.items():
            assert isinstance(traced, cs.Graph)
            for net in (traced, hand):
                net.reset_state()
            a = traced.forward_steps(clip)
            b = hand.forward_steps(clip)
            err = float((a - b).abs().max())
            if err > 1e-4:
                raise SystemExit(f"{name}: traced and hand-built outputs differ by {err}")
            t = time_steps({"traced": traced, "hand": hand}, clip, repeats, block)
            med = {k: statistics.median(v) for k, v in t.items()}
            rows.append({"workload": name, "traced_ms": med["traced"] * 1e3,
                         "hand_ms": med["hand"] * 1e3, "ratio": med["traced"] / med["hand"],
                         "max_abs_diff": err, "delay": traced.delay})
    other = load.others()
    stem = "graph_overhead_quick" if args.quick else "graph_overhead"
    cmd = "python benchmarks/graph_overhead.py" + (" " + shlex.join(argv or sys.argv[1:])
                                                   if (argv or sys.argv[1:]) else "")
    report = {"command": cmd, "machine": machine(), "threads": 1, "repeats": repeats,
              "steps_per_block": block, "other_load_cpus": other, "rows": rows}
    lines = ["# Graph conversion step overhead\n", f"Command: `{cmd}`\n",
             f"Machine: {report['machine']['cpu_model']}, {report['machine']['logical_cpus']} "
             f"CPUs; torch {report['machine']['torch']}; 1 thread, batch 1, float32. Other "
             f"processes kept {other if other is None else round(other, 2)} CPUs busy on "
             f"average while timing.\n",
             "| workload | traced ms/step | hand-built ms/step | ratio | max abs diff |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['workload']} | {r['traced_ms']:.3f} | {r['hand_ms']:.3f} | "
                     f"{r['ratio']:.3f} | {r['max_abs_diff']:.1e} |")
    write_report(args.out, stem, report, "\n".join(lines) + "\n")
    for r in rows:
        print(f"{r['workload']}: traced {r['traced_ms']:.3f} ms, hand {r['hand_ms']:.3f} ms, "
              f"ratio {r['ratio']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
