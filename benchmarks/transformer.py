"""Transformer benchmark: continual encoders of costream vs continual-inference vs a window.

Workloads of REFERENCE.md section 2: a ``torch.nn.TransformerEncoder`` with 1 or 2 post-norm
layers (d=512, 8 heads, feed-forward 2048, ReLU), attending over the last n=64 tokens. Three
implementations share the same weights and are timed side by side (batch 1, float32, eval mode,
``torch.inference_mode()``):

* ``costream``: ``costream.continual(model, temporal_window=64).forward_step(token)``;
* ``anchor``: continual-inference 1.2.4, ``continual.TransformerEncoder`` built with its own
  ``TransformerEncoderLayerFactory`` (single-output layer; retroactive + single-output for 2
  layers), weights copied from the torch model;
* ``window``: the torch encoder on a window buffer shifted by one token per step (the newest
  token's output).

Before timing, the stepped outputs of costream and the anchor are compared with the torch
encoder on every window of a clip. Timing interleaves the implementations (order rotating per
repeat) and reports medians over all timed steps. MACs per step are counted with
``torch.utils.flop_counter.FlopCounterMode`` (FLOPs / 2; matrix products only, CPU
scaled-dot-product attention included) and set against the Continual Transformers formulas
(arXiv 2201.06268) per head and step, with d the head dim: regular ``2n^2 d + 2nd``,
retroactive ``7nd + 2n - 3d``, single-output ``2nd + 2d``; plus the linear layers.

Usage::

    python benchmarks/transformer.py                  # 1 and 2 threads; writes
                                                      # benchmarks/results/transformer.{json,md}
    python benchmarks/transformer.py --quick          # smoke run (transformer_quick.*)
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import continual
import torch
from _common import OtherLoad, machine, wait_idle, write_report
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

import costream

D, HEADS, FF, N = 512, 8, 2048, 64
IMPLS = ("costream", "anchor", "window")
TARGETS = {1: 1.5, 2: 3.0}  # required anchor / costream latency ratio
_PARAMS = ("self_attn.in_proj_weight", "self_attn.in_proj_bias", "self_attn.out_proj.weight",
           "self_attn.out_proj.bias", "norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias",
           "linear1.weight", "linear1.bias", "linear2.weight", "linear2.bias")


# ---------------------------------------------------------------------------- models
def make_models(layers: int, seed: int = 0) -> tuple[nn.Module, nn.Module, nn.Module]:
    """The torch encoder, costream's conversion of it and the anchor with the same weights."""
    torch.manual_seed(seed)
    layer = nn.TransformerEncoderLayer(D, HEADS, FF, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False).eval()
    # running sums: the update of the paper and of the anchor (the exact default recomputes)
    co_net = costream.continual(model, temporal_window=N, attention="running").eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        factory = continual.TransformerEncoderLayerFactory(
            d_model=D, nhead=HEADS, dim_feedforward=FF, dropout=0.0, sequence_len=N)
        anchor = continual.TransformerEncoder(factory, num_layers=layers).eval()
        src = model.state_dict()
        anchor.load_state_dict({k: src[_torch_key(k)] for k in anchor.state_dict()})
    return model, co_net, anchor


def _torch_key(anchor_key: str) -> str:
    """The torch name of an anchor parameter (the anchor nests layers in its own containers)."""
    flat = anchor_key.replace(".fn.", ".")
    layer = int(anchor_key.split(".")[1])
    for name in _PARAMS:
        if flat.endswith("." + name):
            return f"layers.{layer}.{name}"
    raise KeyError(anchor_key)


def reset(module: nn.Module) -> None:
    (module.reset_state if hasattr(module, "reset_state") else module.clean_state)()


class SlidingWindow:
    """The torch encoder on the last ``N`` tokens, the buffer shifted by one token per step."""

    def __init__(self, model: nn.Module, clip: Tensor) -> None:
        self.model = model
        self.buffer = clip[:, :, :N].transpose(1, 2).contiguous()  # (1, N, D)

    def forward_step(self, token: Tensor) -> Tensor:
        self.buffer = torch.cat((self.buffer[:, 1:], token.unsqueeze(1)), 1)
        return self.model(self.buffer)[:, -1]


def verify(module: nn.Module, model: nn.Module, clip: Tensor) -> float:
    """Max abs difference of the stepped outputs from the torch encoder on each window."""
    reset(module)
    with torch.inference_mode():
        outs = [module.forward_step(clip[:, :, t]) for t in range(clip.shape[2])]
        windows = clip.unfold(2, N, 1).permute(0, 2, 3, 1)[0]  # (T', N, D)
        ref = model(windows)[:, -1]
    reset(module)
    if any(y is not None for y in outs[:N - 1]) or any(y is None for y in outs[N - 1:]):
        raise AssertionError("outputs are due exactly from step N - 1 on")
    got = torch.cat(outs[N - 1:], 0)
    return float((got - ref).abs().max())


# ---------------------------------------------------------------------------- MACs
def _sdpa(q: Any, k: Any, v: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    return sdpa_flop_count(q, k, v)


def counted_macs(fn: Callable[[], Any]) -> dict[str, int]:
    """MACs of the matrix products of ``fn()``, split into dense layers and attention."""
    mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa}
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        fn()
    per_op = {str(op): int(f) // 2 for op, f in counter.get_flop_counts()["Global"].items()}
    dense = sum(v for k, v in per_op.items() if k.split(".")[1] in ("addmm", "mm"))
    total = int(counter.get_total_flops()) // 2
    return {"total": total, "dense": dense, "attention": total - dense, "per_op": per_op}


def paper_macs(layers: int) -> dict[str, int]:
    """Per step: the paper's attention formulas (d = head dim) plus the dense layers."""
    n, dh = N, D // HEADS
    regular = 2 * n * n * dh + 2 * n * dh
    retro = 7 * n * dh + 2 * n - 3 * dh
    single = 2 * n * dh + 2 * dh
    ff_one = 2 * D * FF
    if layers == 1:
        dense = 3 * D * D + D * D + ff_one
        att = HEADS * single
    else:  # retroactive layer: all n outputs projected and fed forward; single-output last
        dense = 3 * D * D + n * D * D + n * ff_one + 2 * n * D * D + D * D + D * D + ff_one
        att = HEADS * (retro + single)
    window_layer = 4 * n * D * D + n * ff_one, HEADS * regular
    return {"costream_dense": dense, "costream_attention": att, "costream_total": dense + att,
            "window_dense": layers * window_layer[0], "window_attention": layers * window_layer[1],
            "window_total": layers * sum(window_layer),
            "per_head": {"regular": regular, "retroactive": retro, "single_output": single}}


def measure_macs(layers: int, model: nn.Module, co_net: nn.Module, anchor: nn.Module,
                 clip: Tensor) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, module in (("costream", co_net), ("anchor", anchor)):
        reset(module)
        with torch.inference_mode():
            for t in range(N + 2):
                module.forward_step(clip[:, :, t])
            out[name] = counted_macs(lambda m=module: m.forward_step(clip[:, :, N + 2]))
        reset(module)
    window = clip[:, :, :N].transpose(1, 2)
    with torch.enable_grad():  # the unfused path, so torch's encoder layers can be counted
        out["window"] = counted_macs(lambda: model(window))
    out["paper"] = paper_macs(layers)
    return out


# ---------------------------------------------------------------------------- timing
def wait_quiet(limit: float) -> dict[str, float]:
    waited, busy = wait_idle(limit)
    return {"waited_s": waited, "busy_cpus": busy}


def run(layers: int, threads: int, repeats: int, block: dict[str, int],
        built: dict[str, Any]) -> dict[str, Any]:
    model, co_net, anchor, clip = (built[k] for k in ("model", "costream", "anchor", "clip"))
    torch.set_num_threads(threads)
    frames = [clip[:, :, t].contiguous() for t in range(clip.shape[2])]
    steppers = {"costream": co_net.forward_step, "anchor": anchor.forward_step,
                "window": SlidingWindow(model, clip).forward_step}
    samples: dict[str, list[int]] = {k: [] for k in IMPLS}
    medians: dict[str, list[float]] = {k: [] for k in IMPLS}
    pos = dict.fromkeys(IMPLS, 0)
    clock = time.perf_counter_ns
    meter = OtherLoad()

    def timed(impl: str, steps: int) -> list[int]:
        ns = []
        for _ in range(steps):
            f = frames[pos[impl] % len(frames)]
            pos[impl] += 1
            t0 = clock()
            steppers[impl](f)
            ns.append(clock() - t0)
        return ns

    with torch.inference_mode():
        reset(co_net)
        reset(anchor)
        for impl in IMPLS:  # past the warm-up, then a few steady steps
            timed(impl, N + max(3, block[impl] // 4))
        for r in range(repeats):
            for j in range(len(IMPLS)):
                impl = IMPLS[(r + j) % len(IMPLS)]
                ns = timed(impl, block[impl])
                samples[impl] += ns
                medians[impl].append(statistics.median(ns))
    reset(co_net)
    reset(anchor)
    other = meter.others()
    lat = {k: {"median_us": statistics.median(v) / 1e3,
               "q1_us": statistics.quantiles(v, n=4)[0] / 1e3,
               "q3_us": statistics.quantiles(v, n=4)[2] / 1e3, "samples": len(v)}
           for k, v in samples.items()}
    ratios = {f"{o}_over_costream": lat[o]["median_us"] / lat["costream"]["median_us"]
              for o in ("anchor", "window")}
    spread = {o: [a / c for a, c in zip(medians[o], medians["costream"], strict=True)]
              for o in ("anchor", "window")}
    target = TARGETS[layers]
    return {
        "workload": f"{layers}_layer", "threads": threads, "repeats": repeats,
        "steps_per_repeat": block, "latency": lat, "ratios": ratios,
        "ratio_per_repeat": {o: {"min": min(v), "median": statistics.median(v), "max": max(v)}
                             for o, v in spread.items()},
        "target_anchor_over_costream": target,
        "target_met": ratios["anchor_over_costream"] >= target
        and ratios["window_over_costream"] > 1.0,
        "other_processes_cpus": other,
    }


# ---------------------------------------------------------------------------- reporting
def _m(v: float) -> str:
    return f"{v / 1e6:.3f} M"


def to_markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        "# Transformer benchmark: costream vs continual-inference vs sliding window", "",
        f"Command: `{report['command']}`", "",
        f"Machine: {m['cpu_model']}, {m['logical_cpus']} logical CPUs; torch {m['torch']}, "
        f"continual-inference {m['continual_inference']}, costream {m['costream']}, Python "
        f"{m['python']}; load average {m['loadavg_at_start']} at start, "
        f"{m['loadavg_at_end']} at end; {m['date_utc']} UTC; {report['elapsed_s']:.0f} s "
        "(excluding waits for idle CPUs).", "",
        f"`torch.nn.TransformerEncoder`, post-norm, d={D}, {HEADS} heads, feed-forward {FF}, "
        f"ReLU, window n={N}; batch 1, float32, eval, `torch.inference_mode()`, the same "
        "weights for all three. Per-step latency in µs: median (interquartile range) over all "
        "timed steps, implementations interleaved in short blocks; ratios of the medians, "
        "measured side by side (in brackets: median; min-max over repeats of the ratio of "
        "block medians). Target: anchor / "
        "costream >= 3 (2 layers), >= 1.5 (1 layer), and window / costream > 1. Other load: "
        "CPUs used by other processes on average during the run.", "",
        "| layers | threads | costream µs | anchor µs | window µs | anchor / costream | "
        "window / costream | target | met | other load (CPUs) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        lat = r["latency"]
        cells = [f"{lat[k]['median_us']:.0f} ({lat[k]['q1_us']:.0f}-{lat[k]['q3_us']:.0f})"
                 for k in IMPLS]
        rr = r["ratio_per_repeat"]
        lines.append(
            f"| {r['workload'][0]} | {r['threads']} | {' | '.join(cells)} | "
            f"**{r['ratios']['anchor_over_costream']:.2f}x** ({rr['anchor']['median']:.2f}; "
            f"{rr['anchor']['min']:.2f}-{rr['anchor']['max']:.2f}) | "
            f"{r['ratios']['window_over_costream']:.2f}x ({rr['window']['median']:.2f}; "
            f"{rr['window']['min']:.2f}-{rr['window']['max']:.2f}) | "
            f"{r['target_anchor_over_costream']:g}x | {'yes' if r['target_met'] else 'no'} | "
            f"{r['other_processes_cpus']:.2f} |")
    lines += [
        "", "## MACs per step", "",
        "Counted with `FlopCounterMode` (matrix products only: dense layers = `addmm`/`mm`, "
        "attention = batched products and scaled-dot-product attention) next to the paper's "
        "per-head formulas (d = head dim = 64): regular 2n²d + 2nd, retroactive 7nd + 2n - 3d, "
        "single-output 2nd + 2d, times 8 heads, plus the dense layers. The paper's attention "
        "counts include element-wise work (softmax, running-sum updates) that the counter "
        "does not see; costream's retroactive step executes 4nd - 2d MACs of matrix products "
        "and 4nd - 3d element-wise products per head.", "",
        "| layers | costream dense | costream attention | paper dense | paper attention | "
        "anchor total | window total (counted) | window (formula) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, s in report["static"].items():
        c, p = s["macs"]["costream"], s["macs"]["paper"]
        lines.append(f"| {name[0]} | {_m(c['dense'])} | {_m(c['attention'])} | "
                     f"{_m(p['costream_dense'])} | {_m(p['costream_attention'])} | "
                     f"{_m(s['macs']['anchor']['total'])} | {_m(s['macs']['window']['total'])} "
                     f"| {_m(p['window_total'])} |")
    lines += ["", "## Stepped outputs vs the torch encoder on each window (max abs error)", ""]
    for name, s in report["static"].items():
        err = s["max_abs_error"]
        lines.append(f"- {name}: costream {err['costream']:.2e}, anchor {err['anchor']:.2e}"
                     + (" (anchor defect: its 2-layer stepping diverges from the torch "
                        "encoder once the window has turned over)" if err["anchor"] > 1e-3
                        else ""))
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=41)
    p.add_argument("--quick", action="store_true", help="smoke run (writes transformer_quick.*)")
    p.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                   help="before each timing run, wait up to SECONDS for idle CPUs")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = p.parse_args(argv)
    raw = sys.argv[1:] if argv is None else argv
    report: dict[str, Any] = {"command": shlex.join(["python", "benchmarks/transformer.py", *raw]),
                              "machine": machine(continual_inference=continual.__version__),
                              "static": {}, "results": [],
                              "quiet_waits": []}
    start = time.perf_counter()
    built: dict[int, dict[str, Any]] = {}
    for layers in (1, 2):
        model, co_net, anchor = make_models(layers)
        clip = torch.randn(1, D, 3 * N, generator=torch.Generator().manual_seed(layers))
        errors = {"costream": verify(co_net, model, clip), "anchor": verify(anchor, model, clip)}
        if errors["costream"] > 1e-4:
            raise AssertionError(f"costream stepping differs from torch: {errors['costream']}")
        built[layers] = {"model": model, "costream": co_net, "anchor": anchor, "clip": clip}
        report["static"][f"{layers}_layer"] = {
            "max_abs_error": errors, "macs": measure_macs(layers, model, co_net, anchor, clip)}
        print(f"[{layers} layer] errors {errors}", flush=True)
    for threads in args.threads:
        for layers in (1, 2):
            if args.wait_quiet > 0:
                report["quiet_waits"].append(wait_quiet(args.wait_quiet))
            block = ({"costream": 60, "anchor": 30, "window": 8} if layers == 1
                     else {"costream": 6, "anchor": 3, "window": 4})
            repeats = 3 if args.quick else args.repeats
            res = run(layers, threads, repeats, block, built[layers])
            report["results"].append(res)
            print(f"[{layers} layer, {threads} thr] " + ", ".join(
                f"{k} {res['latency'][k]['median_us']:.0f} us" for k in IMPLS)
                + f"; anchor/costream {res['ratios']['anchor_over_costream']:.2f}x", flush=True)
    waited = sum(w["waited_s"] for w in report["quiet_waits"])
    report["elapsed_s"] = time.perf_counter() - start - waited  # excluding the quiet waits
    report["machine"]["loadavg_at_end"] = os.getloadavg()
    write_report(args.out, "transformer_quick" if args.quick else "transformer", report,
                 to_markdown(report))
    return report


if __name__ == "__main__":
    main()
