"""ST-GCN family on the CPU: per-prediction latency of the offline networks on a 300-frame window
against one continual step, MACs, and exactness.

One run measures, at batch 1 (float32, eval mode, ``torch.inference_mode()``, NTU RGB+D input:
25 joints, 2 persons, random weights with non-trivial batch-norm statistics):

* **latency per prediction**: the offline network (ST-GCN, AGCN, S-TR) on one 300-frame window
  against one ``forward_step`` of its continual * version (CoST-GCN*, CoAGCN*, CoS-TR*: stride 1,
  no temporal padding, one prediction per frame) in steady state, with the same weights. The two
  are interleaved (one window, then ``--steps`` steps, per repeat) and summarised by medians and
  quartiles of wall-clock time and of the thread's CPU time (``time.thread_time``, steadier on a
  shared machine). CoST-GCN (strides kept) is timed per prediction too: the 4 steps that make one.
* **MACs** per prediction: the papers' convention (ptflops module hooks: no adjacency or
  attention matrix products) and costream's full count (:mod:`costream.bench`).
* **exactness**: each stepped CoX* prediction against the same module's ``forward`` on the
  300-frame window it covers (float32), and CoST-GCN's stepped predictions against its
  ``forward`` over the whole stream.

Usage::

    python benchmarks/skeleton.py                      # writes benchmarks/results/skeleton.*
    python benchmarks/skeleton.py --quick --out /tmp   # smoke run (skeleton_quick.*)
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from _common import write_report

from costream.bench import PtflopsCounter
from costream.bench._report import cpu_model
from costream.models import create_model

T, V, M = 300, 25, 2
PAIRS = (("st_gcn", "cost_gcn_star"), ("agcn", "coagcn_star"), ("s_tr", "cos_tr_star"))
NAMES = {"st_gcn": "ST-GCN", "cost_gcn_star": "CoST-GCN*", "agcn": "AGCN",
         "coagcn_star": "CoAGCN*", "s_tr": "S-TR", "cos_tr_star": "CoS-TR*",
         "cost_gcn": "CoST-GCN"}
PAPER_GMACS = {"st_gcn": 16.73, "cost_gcn_star": 0.16, "agcn": 18.69, "coagcn_star": 0.17,
               "s_tr": 16.14, "cos_tr_star": 0.15, "cost_gcn": 0.27}
MATMUL = ("mm", "bmm", "matmul")


def build(offline: str, continual: str, seed: int = 0) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The offline network and its continual version with the same random weights."""
    torch.manual_seed(seed)
    off = create_model(offline)
    for m in off.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.1)
    co = create_model(continual)
    co.load_state_dict(off.state_dict())
    return off.eval(), co.eval()


def _summary(values: list[float]) -> dict[str, float]:
    q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return {"median_ms": q[1] * 1e3, "q1_ms": q[0] * 1e3, "q3_ms": q[2] * 1e3, "n": len(values)}


def latency(offline: torch.nn.Module, continual: torch.nn.Module, repeats: int, steps: int,
            per_prediction: int = 1) -> dict[str, Any]:
    """Interleaved: one offline window, then ``steps`` predictions (``per_prediction`` steps
    each) of the continual network, per repeat (the first repeat is a warm-up)."""
    frames = continual.delay + 1 + steps * per_prediction * (repeats + 1)
    stream = torch.randn(1, 3, frames, V, M)
    window = stream[:, :, :T].contiguous()
    wall: dict[str, list[float]] = {"offline": [], "continual": []}
    cpu: dict[str, list[float]] = {"offline": [], "continual": []}
    continual.reset_state()
    load0 = os.getloadavg()
    with torch.inference_mode():
        continual.forward_steps(stream[:, :, :continual.delay + 1])
        i = continual.delay + 1
        for r in range(repeats + 1):
            w0, c0 = time.perf_counter(), time.thread_time()
            offline(window)
            w1, c1 = time.perf_counter(), time.thread_time()
            if r:
                wall["offline"].append(w1 - w0)
                cpu["offline"].append(c1 - c0)
            for _ in range(steps):
                w0, c0 = time.perf_counter(), time.thread_time()
                for _ in range(per_prediction):
                    y = continual.forward_step(stream[:, :, i])
                    i += 1
                w1, c1 = time.perf_counter(), time.thread_time()
                assert y is not None
                if r:
                    wall["continual"].append(w1 - w0)
                    cpu["continual"].append(c1 - c0)
    continual.reset_state()
    res: dict[str, Any] = {"repeats": repeats, "steps": steps, "per_prediction": per_prediction,
                           "loadavg": [load0, os.getloadavg()]}
    for kind, data in (("wall", wall), ("cpu", cpu)):
        res[kind] = {k: _summary(v) for k, v in data.items()}
        res[kind]["ratio"] = (res[kind]["offline"]["median_ms"] /
                              res[kind]["continual"]["median_ms"])
    return res


def macs(name: str) -> dict[str, float]:
    """GMACs per prediction (paper convention and full count), counted on meta tensors."""
    model = create_model(name).to("meta")
    counts = {"all": 0, "paper": 0}
    with torch.no_grad():
        if name in ("st_gcn", "agcn", "s_tr"):
            with PtflopsCounter() as c:
                model(torch.empty(1, 3, T, V, M, device="meta"))
            counters, outputs = [c], 1
        else:
            state = model.init_state(1, (3, V, M), device="meta")
            counters, outputs = [], 0
            for _ in range(model.temporal.stride):
                with PtflopsCounter() as c:
                    y, state = model.step(torch.empty(1, 3, V, M, device="meta"), state)
                counters.append(c)
                outputs += y is not None
    for c in counters:
        counts["all"] += c.total
        counts["paper"] += c.total - sum(c.by_op[op] for op in MATMUL)
    return {k: v / outputs / 1e9 for k, v in counts.items()}


def exactness(offline_name: str, continual: torch.nn.Module, windows: int) -> dict[str, float]:
    """Max |stepped - forward| in float32 (see the module docstring)."""
    torch.manual_seed(2)
    stream = torch.randn(1, 3, continual.receptive_field + windows - 1, V, M)
    continual.reset_state()
    with torch.inference_mode():
        stepped = continual.forward_steps(stream)
        if continual.star:  # each prediction against the module on its own window
            ref = torch.cat([continual(stream[:, :, j: j + T]) for j in range(windows)], 2)
        else:
            ref = continual(stream)[:, :, : stepped.shape[2]]
    continual.reset_state()
    return {"predictions": stepped.shape[2], "max_abs_diff": (stepped - ref).abs().max().item(),
            "max_abs_logit": ref.abs().max().item()}


def to_markdown(r: dict[str, Any]) -> str:
    m = r["machine"]
    lines = [
        "# ST-GCN family: offline windows vs continual steps",
        "",
        f"Command: `{r['command']}`",
        "",
        f"Machine: {m['cpu']}, {m['cpus']} CPUs, torch {m['torch']}, Python {m['python']}; "
        f"{r['threads']} thread(s); load average {m['loadavg'][0]:.2f} at the start, "
        f"{r['loadavg_end']:.2f} at the end (a shared machine: CPU times are the steadier "
        f"measure). NTU RGB+D input (25 joints, 2 persons), random weights, float32, batch 1, "
        f"`torch.inference_mode()`; {r['elapsed_s']:.0f} s.",
        "",
        "## Latency per prediction",
        "",
        "Offline: the network on one 300-frame window (one prediction). Continual: one "
        "`forward_step` of the * version (one prediction per frame, same weights), in steady "
        "state; for CoST-GCN (strides kept) the 4 steps that make one prediction. Interleaved "
        "repeats; medians [quartiles].",
        "",
        "| offline | continual | offline wall (ms) | continual wall (ms) | wall ratio | offline "
        "CPU (ms) | continual CPU (ms) | CPU ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def cell(d: dict[str, float]) -> str:
        return f"{d['median_ms']:.2f} [{d['q1_ms']:.2f}, {d['q3_ms']:.2f}]"

    for row in r["latency"]:
        w, c = row["wall"], row["cpu"]
        lines.append(f"| {NAMES[row['offline']]} | {NAMES[row['continual']]} | "
                     f"{cell(w['offline'])} | {cell(w['continual'])} | {w['ratio']:.1f}x | "
                     f"{cell(c['offline'])} | {cell(c['continual'])} | {c['ratio']:.1f}x |")
    main = r["latency"][0]
    target = min(main["wall"]["ratio"], main["cpu"]["ratio"]) >= 40
    lines += [
        "",
        f"Target (CoST-GCN* stepping vs ST-GCN on a 300-frame window, at least 40x): "
        f"**{'met' if target else 'not met'}** (wall {main['wall']['ratio']:.1f}x, CPU "
        f"{main['cpu']['ratio']:.1f}x; the paper measured 20x on its CPU: 2.3 vs 46.1 "
        "predictions/s).",
        "",
        "## MACs per prediction",
        "",
        "Paper convention: ptflops module hooks (convolutions, linear layers, norms, "
        "activations, pools), which do not see the products with the adjacency or the "
        "attention products; all: costream's counter, which does. Continual networks are "
        "counted with the pure step (for CoST-GCN: every tap of its strided convolutions at "
        "every frame, as the paper counts).",
        "",
        "| network | GMACs (paper convention) | GMACs (all) | paper |",
        "|---|---|---|---|",
    ]
    for name, mac in r["macs"].items():
        lines.append(f"| {NAMES[name]} | {mac['paper']:.3f} | {mac['all']:.3f} | "
                     f"{PAPER_GMACS[name]} |")
    lines += ["", "Reductions (paper convention): " + "; ".join(
        f"{NAMES[o]} / {NAMES[c]} {r['macs'][o]['paper'] / r['macs'][c]['paper']:.1f}x"
        for o, c in PAIRS if o in r["macs"] and c in r["macs"]) + " (paper: 107.7x, 108.8x, "
        "107.6x).", "", "## Exactness (float32)", "",
        "| network | predictions | max abs difference | max abs logit |", "|---|---|---|---|"]
    for name, e in r["exactness"].items():
        lines.append(f"| {NAMES[name]} | {e['predictions']} | {e['max_abs_diff']:.2e} | "
                     f"{e['max_abs_logit']:.2e} |")
    lines += ["", "CoX*: each stepped prediction against `forward` on the 300-frame window it "
              "covers; CoST-GCN: stepped predictions against `forward` over the whole stream."]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=15, help="interleaved repeats")
    parser.add_argument("--steps", type=int, default=20, help="continual predictions per repeat")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--main-only", action="store_true",
                        help="only ST-GCN vs CoST-GCN* (skip the AGCN, S-TR and CoST-GCN rows)")
    parser.add_argument("--quick", action="store_true", help="smoke run (skeleton_quick.*)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    raw = sys.argv[1:] if argv is None else argv
    t0 = time.perf_counter()
    torch.set_num_threads(args.threads)
    repeats, steps = (2, 3) if args.quick else (args.repeats, args.steps)
    pairs = PAIRS[:1] if args.main_only or args.quick else PAIRS
    report: dict[str, Any] = {
        "command": shlex.join(["python", "benchmarks/skeleton.py", *raw]),
        "machine": {"cpu": cpu_model(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "python": platform.python_version(), "loadavg": os.getloadavg()},
        "threads": args.threads, "latency": [], "macs": {}, "exactness": {},
    }
    for offline_name, continual_name in pairs:
        offline, continual = build(offline_name, continual_name)
        res = latency(offline, continual, repeats, steps)
        res.update(offline=offline_name, continual=continual_name)
        report["latency"].append(res)
        print(f"{offline_name} vs {continual_name}: wall {res['wall']['ratio']:.1f}x, "
              f"CPU {res['cpu']['ratio']:.1f}x", flush=True)
        report["exactness"][continual_name] = exactness(offline_name, continual,
                                                        2 if args.quick else 3)
        if offline_name == "st_gcn" and not args.quick and not args.main_only:
            strided = create_model("cost_gcn")
            strided.load_state_dict(offline.state_dict())
            res = latency(offline, strided, repeats, max(1, steps // 4), per_prediction=4)
            res.update(offline=offline_name, continual="cost_gcn")
            report["latency"].append(res)
            report["exactness"]["cost_gcn"] = exactness(offline_name, strided, 3)
        for name in (offline_name, continual_name):
            report["macs"][name] = macs(name)
    if "cost_gcn" in report["exactness"]:
        report["macs"]["cost_gcn"] = macs("cost_gcn")
    report["loadavg_end"] = os.getloadavg()[0]
    report["elapsed_s"] = time.perf_counter() - t0
    write_report(args.out, "skeleton_quick" if args.quick else "skeleton", report,
                 to_markdown(report))
    return report


if __name__ == "__main__":
    main()
