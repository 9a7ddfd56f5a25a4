"""Core benchmark: per-step latency of costream against continual-inference and a sliding window.

Three implementations of the same network, with the same weights, are timed side by side in one
run (batch 1, float32, eval mode, under ``torch.inference_mode()``):

* ``costream``: ``costream.continual(model).forward_step(frame)``;
* ``anchor``: ``continual.continual(model).forward_step(frame)`` (continual-inference 1.2.4);
* ``window``: the ``torch.nn`` model recomputing the whole sliding window every step (the window
  buffer is shifted by one frame, then the model runs on it).

Before timing, the stepped outputs of costream and of the anchor are checked against the offline
model on a clip. The implementations are interleaved across repeats (their order rotates; each
block of timed steps starts with a few untimed ones, so that every implementation is timed with
its own weights in cache) and the per-step latencies of all repeats are summarised by their
median and interquartile range. The CPU time other processes take during each repeat is read
from /proc/stat; a repeat they competed in is measured again (``--max-other-load``), and
``--wait-quiet`` waits for an idle machine before timing starts.
MACs per step (multiply-accumulates of convolutions and matrix multiplications, counted with
``torch.utils.flop_counter``) are reported as executed by each implementation and as the
theoretical cost of one output frame of every layer.

Usage::

    python benchmarks/core.py                     # full run, 1 and 2 threads
    python benchmarks/core.py --wait-quiet 1800   # the same, once the machine is idle
    python benchmarks/core.py --quick             # smoke run (writes core_quick.*)
    python benchmarks/core.py --threads 1 --repeats 5 --workloads tiny tcn

Results go to ``<out>/core.json`` and ``<out>/core.md``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import continual
import torch
from _common import OtherLoad, write_report
from torch import Tensor, nn

import costream
from costream.bench import count_macs, step_macs, theoretical_step_macs
from costream.bench._report import cpu_model

IMPLS = ("costream", "anchor", "window")


# ---------------------------------------------------------------------------- workloads
@dataclass(frozen=True)
class Workload:
    """A benchmark network and its window clip, with the timing plan for a full run."""

    name: str
    description: str
    build: Callable[[], nn.Module]
    clip_shape: tuple[int, ...]
    target: float  # required speed-up of costream over the anchor
    block_steps: int  # timed steps per implementation and repeat (stepping implementations)
    window_block_steps: int  # the same for the sliding window
    repeats: int
    warm_in: int  # untimed steps at the start of every block (brings the weights into cache)


def _randomise_batchnorm(model: nn.Module, gen: torch.Generator) -> None:
    """Give batch norms non-trivial running statistics and affine parameters."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            c = m.num_features
            with torch.no_grad():
                m.running_mean.copy_(torch.rand(c, generator=gen) * 0.2 - 0.1)
                m.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(c, generator=gen) + 0.5)
                m.bias.copy_(torch.rand(c, generator=gen) * 0.2 - 0.1)


def build_3d_cnn() -> nn.Module:
    """8 x Conv3d 3x3x3 (padding 1), 3->24->24->48->48->96->96->96->96, BN + ReLU after each;
    spatial stride 2 on the 1st, 3rd and 5th conv."""
    channels = (3, 24, 24, 48, 48, 96, 96, 96, 96)
    layers: list[nn.Module] = []
    for i in range(8):
        s = 2 if i in (0, 2, 4) else 1
        layers += [nn.Conv3d(channels[i], channels[i + 1], 3, stride=(1, s, s), padding=1),
                   nn.BatchNorm3d(channels[i + 1]), nn.ReLU()]
    return nn.Sequential(*layers)


def build_conv1d_stack(channels: int, depth: int) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        layers: list[nn.Module] = []
        for i in range(depth):
            layers.append(nn.Conv1d(channels, channels, 3, padding=1))
            if i < depth - 1:
                layers.append(nn.ReLU())
        return nn.Sequential(*layers)

    return build


WORKLOADS = {
    w.name: w
    for w in (
        Workload("3d_cnn", "8 x Conv3d 3x3x3, 24-96 ch, BN+ReLU, clip (1, 3, 16, 112, 112)",
                 build_3d_cnn, (1, 3, 16, 112, 112), 5.0, 4, 2, 80, 1),
        Workload("tcn", "10 x Conv1d(256, 256, k=3, padding=1), ReLU between, T=64",
                 build_conv1d_stack(256, 10), (1, 256, 64), 8.0, 30, 30, 120, 8),
        Workload("tiny", "3 x Conv1d(16, 16, k=3, padding=1), ReLU between, T=64",
                 build_conv1d_stack(16, 3), (1, 16, 64), 5.0, 300, 300, 80, 20),
    )
}


def make_model(w: Workload, seed: int = 0) -> tuple[nn.Module, Tensor]:
    """The workload's ``torch.nn`` model (eval mode, seeded weights) and a random window clip."""
    torch.manual_seed(seed)
    model = w.build()
    _randomise_batchnorm(model, torch.Generator().manual_seed(seed + 1))
    model.eval()
    clip = torch.randn(w.clip_shape, generator=torch.Generator().manual_seed(seed + 2))
    return model, clip


# ---------------------------------------------------------------------------- implementations
def _anchor_from_layers(model: nn.Module) -> nn.Module:
    """The anchor network assembled from ``continual`` layers, sharing ``model``'s weights."""
    kinds = {nn.Conv1d: continual.Conv1d, nn.Conv2d: continual.Conv2d,
             nn.Conv3d: continual.Conv3d}
    children: list[nn.Module] = []
    for child in model.children():
        cls = kinds.get(type(child))
        if cls is None:
            children.append(child)
            continue
        conv = cls(child.in_channels, child.out_channels, child.kernel_size, stride=child.stride,
                   padding=child.padding, dilation=child.dilation, groups=child.groups,
                   bias=child.bias is not None)
        conv.load_state_dict(child.state_dict())
        children.append(conv.eval())
    return continual.Sequential(*children).eval()


def make_anchor(model: nn.Module) -> tuple[nn.Module, str]:
    """``continual.continual(model)``, or the same network built from ``continual`` layers."""
    try:
        return continual.continual(model).eval(), "continual.continual(model)"
    except Exception:  # a module type the anchor cannot convert
        return _anchor_from_layers(model), "continual.Sequential of continual layers"


def reset(module: nn.Module) -> None:
    if hasattr(module, "reset_state"):
        module.reset_state()
    else:
        module.clean_state()


class SlidingWindow:
    """The offline model on a window buffer that is shifted by one frame each step."""

    def __init__(self, model: nn.Module, clip: Tensor) -> None:
        self.model = model
        self.buffer = clip.clone()

    def forward_step(self, frame: Tensor) -> Tensor:
        self.buffer = torch.cat((self.buffer[:, :, 1:], frame.unsqueeze(2)), dim=2)
        return self.model(self.buffer)


def delay_of(module: nn.Module) -> int:
    temporal = getattr(module, "temporal", None)
    return int(temporal.delay if temporal is not None else module.delay)


def verify(name: str, module: nn.Module, model: nn.Module, clip: Tensor) -> int:
    """Step ``module`` over ``clip``; assert the due outputs equal ``model(clip)``.

    Returns the number of outputs compared.
    """
    delay = delay_of(module)
    reset(module)
    with torch.inference_mode():
        ref = model(clip)
        outs = [module.forward_step(clip[:, :, t]) for t in range(clip.shape[2])]
    reset(module)
    early = [t for t, y in enumerate(outs[:delay]) if y is not None]
    missing = [t for t, y in enumerate(outs) if t >= delay and y is None]
    if early or missing:
        raise AssertionError(f"{name}: outputs at steps {early} before the delay {delay}, "
                             f"none at steps {missing}")
    got = torch.stack(outs[delay:], dim=2)
    want = ref[:, :, : got.shape[2]]
    scale = float(want.abs().max())
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * max(1.0, scale),
                               msg=lambda m: f"{name} stepped outputs differ from the model: {m}")
    return got.shape[2]


def state_bytes(tree: Any) -> int:
    """Bytes of all tensors in a (nested) state."""
    if isinstance(tree, Tensor):
        return tree.numel() * tree.element_size()
    if isinstance(tree, dict):
        return sum(state_bytes(v) for v in tree.values())
    if isinstance(tree, (tuple, list)):
        return sum(state_bytes(v) for v in tree)
    return 0


def anchor_state_bytes(anchor: nn.Module) -> int:
    """Bytes of the state tensors held by the anchor's leaf modules."""
    total = 0
    for m in anchor.modules():
        if next(m.children(), None) is None and hasattr(m, "get_state"):
            total += state_bytes(m.get_state())
    return total


# ---------------------------------------------------------------------------- machine load
def wait_quiet(max_wait: float, threshold: float = 0.2, need: int = 5) -> dict[str, Any]:
    """Wait (up to ``max_wait`` s) until other processes used under ``threshold`` CPUs for
    ``need`` consecutive seconds."""
    t0 = time.perf_counter()
    streak = 0
    while time.perf_counter() - t0 < max_wait:
        meter = OtherLoad()
        time.sleep(1.0)
        load = meter.others()
        if load is None:
            return {"waited_s": 0.0, "quiet": None}
        streak = streak + 1 if load < threshold else 0
        if streak >= need:
            return {"waited_s": time.perf_counter() - t0, "quiet": True}
    return {"waited_s": time.perf_counter() - t0, "quiet": False}


# ---------------------------------------------------------------------------- timing
def time_block(step: Callable[[Tensor], Any], frames: list[Tensor], start: int,
               n: int) -> list[int]:
    """Nanoseconds of each of ``n`` steps, feeding ``frames`` cyclically from ``start``."""
    clock = time.perf_counter_ns
    out = []
    for i in range(n):
        f = frames[(start + i) % len(frames)]
        t0 = clock()
        step(f)
        out.append(clock() - t0)
    return out


def summarise(ns: list[int]) -> dict[str, float]:
    q1, med, q3 = statistics.quantiles(ns, n=4, method="inclusive")
    return {"median_us": med / 1e3, "q1_us": q1 / 1e3, "q3_us": q3 / 1e3,
            "mean_us": statistics.fmean(ns) / 1e3, "samples": len(ns)}


def run_workload(w: Workload, threads: int, repeats: int, quick: bool,
                 built: dict[str, Any], max_other_load: float | None = None) -> dict[str, Any]:
    """Time the three implementations, interleaved; a repeat during which other processes
    kept more than ``max_other_load`` CPUs busy is discarded and measured again (at most
    ``repeats`` times)."""
    model, clip, co_net, anchor = built["model"], built["clip"], built["costream"], built["anchor"]
    torch.set_num_threads(threads)
    frames = [clip[:, :, t].contiguous() for t in range(clip.shape[2])]
    window = SlidingWindow(model, clip)
    steppers = {"costream": co_net.forward_step, "anchor": anchor.forward_step,
                "window": window.forward_step}
    block = {"costream": w.block_steps, "anchor": w.block_steps, "window": w.window_block_steps}
    if quick:
        block = {k: max(2, v // 3) for k, v in block.items()}
    samples: dict[str, list[int]] = {k: [] for k in IMPLS}
    block_medians: dict[str, list[float]] = {k: [] for k in IMPLS}
    position = dict.fromkeys(IMPLS, 0)
    meter = OtherLoad()
    with torch.inference_mode():
        reset(co_net)
        reset(anchor)
        for impl in IMPLS:  # warm-up: past every layer's delay, and a few steady steps
            n = delay_of(co_net) + 2 + max(2, block[impl] // 4)
            time_block(steppers[impl], frames, position[impl], n)
            position[impl] += n
        kept = discarded = r = 0
        while kept < repeats:
            repeat_meter = OtherLoad()
            got: dict[str, list[int]] = {}
            for j in range(len(IMPLS)):
                impl = IMPLS[(r + j) % len(IMPLS)]
                time_block(steppers[impl], frames, position[impl], w.warm_in)
                position[impl] += w.warm_in
                got[impl] = time_block(steppers[impl], frames, position[impl], block[impl])
                position[impl] += block[impl]
            r += 1
            load = repeat_meter.others()
            if (max_other_load is not None and load is not None and load > max_other_load
                    and discarded < repeats):  # another process competed: measure again
                discarded += 1
                time.sleep(0.5)
                continue
            kept += 1
            for impl, ns in got.items():
                samples[impl] += ns
                block_medians[impl].append(statistics.median(ns))
    other_load = meter.others()
    stats = {k: summarise(v) for k, v in samples.items()}
    per_repeat = {
        other: [a / c for a, c in zip(block_medians[other], block_medians["costream"],
                                      strict=True)]
        for other in ("anchor", "window")
    }
    ratios = {
        f"{other}_over_costream": stats[other]["median_us"] / stats["costream"]["median_us"]
        for other in ("anchor", "window")
    }
    ratio_spread = {
        f"{other}_over_costream_per_repeat": {
            "median": statistics.median(v), "min": min(v), "max": max(v)}
        for other, v in per_repeat.items()
    }
    reset(co_net)
    reset(anchor)
    return {
        "workload": w.name,
        "threads": threads,
        "repeats": repeats,
        "discarded_repeats": discarded,
        "steps_per_repeat": block,
        "untimed_steps_before_each_block": w.warm_in,
        "latency": stats,
        "ratios": ratios,
        "ratio_spread": ratio_spread,
        "other_processes_cpus": other_load,
        "target_anchor_over_costream": w.target,
        "target_met": ratios["anchor_over_costream"] >= w.target,
    }


def measure_static(w: Workload, built: dict[str, Any]) -> dict[str, Any]:
    """MACs per step and state sizes (independent of the thread count)."""
    model, clip, co_net, anchor = built["model"], built["clip"], built["costream"], built["anchor"]
    frame = clip[:, :, 0].contiguous()
    theo = theoretical_step_macs(model, clip)
    # per step, over two steps (paired convs split their work unevenly between them)
    co_macs = step_macs(co_net, frame, steps=2) / 2
    an_macs = step_macs(anchor, frame, steps=2) / 2
    with torch.inference_mode():
        win_macs = count_macs(model, clip)
        reset(co_net)
        reset(anchor)
        for t in range(clip.shape[2]):
            co_net.forward_step(clip[:, :, t])
            anchor.forward_step(clip[:, :, t])
        co_state = state_bytes(co_net.get_state()["tree"])
        an_state = anchor_state_bytes(anchor)
        reset(co_net)
        reset(anchor)
    return {
        "macs_per_step": {"theoretical": theo, "costream": co_macs, "anchor": an_macs,
                          "window": win_macs},
        "costream_macs_at_most_theoretical": co_macs <= theo,
        "state_bytes": {"costream": co_state, "anchor": an_state},
        "delay": delay_of(co_net),
    }


# ---------------------------------------------------------------------------- reporting
def _utc_now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def machine_facts(threads: list[int]) -> dict[str, Any]:
    cpu = cpu_model()
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {
        "cpu_model": cpu,
        "logical_cpus": os.cpu_count(),
        "threads": threads,
        "torch": torch.__version__,
        "continual_inference": continual.__version__,
        "costream": costream.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "loadavg_at_start": load,
        "date_utc": _utc_now(),
    }


def _load(v: Any) -> str:
    return "n/a" if v is None else "/".join(f"{x:.2f}" for x in v)


def _cpus(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f} CPU"


def _us(v: float) -> str:
    return f"{v:,.0f}" if v >= 1000 else f"{v:.1f}"


def _macs(v: int) -> str:
    if v >= 10**9:
        return f"{v / 1e9:.3f} G"
    if v >= 10**6:
        return f"{v / 1e6:.3f} M"
    if v >= 10**3:
        return f"{v / 1e3:.3f} K"
    return str(v)


def _bytes(v: int) -> str:
    return f"{v / 2**20:.2f} MiB" if v >= 2**20 else f"{v / 2**10:.1f} KiB"


def to_markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    warm_in = ", ".join(sorted({f"{r['workload']}: {r['untimed_steps_before_each_block']}"
                                for r in report["results"]}))
    lines = [
        "# Core benchmark: costream vs continual-inference vs sliding window",
        "",
        f"Command: `{report['command']}`",
        "",
        f"Machine: {m['cpu_model']}, {m['logical_cpus']} logical CPUs; torch {m['torch']}, "
        f"continual-inference {m['continual_inference']}, costream {m['costream']}, "
        f"Python {m['python']}; threads {', '.join(map(str, m['threads']))}; "
        f"load average (1, 5, 15 min) at start {_load(m['loadavg_at_start'])}, at end "
        f"{_load(m.get('loadavg_at_end'))}; run took {report['elapsed_s']:.0f} s; "
        f"{m['date_utc']} UTC.",
        "",
        "Batch 1, float32, eval mode, `torch.inference_mode()`, the same weights for all three; "
        "stepped outputs of costream and the anchor checked against the offline model first. "
        "Per-step latency in µs: median (interquartile range) over all timed steps, the "
        "implementations interleaved across repeats (blocks of steps, order rotating); every "
        f"block starts with a few untimed steps ({warm_in}) so that each implementation is "
        "timed with its own weights back in cache, as when it runs alone. Ratios are of the "
        "medians, measured in the same run; the per-repeat range is the min-max of the ratio "
        "of block medians. Other load: CPUs kept busy by other processes on the machine during "
        "the timing (from /proc/stat), and the number of repeats discarded and measured again "
        "because other processes competed during them.",
        "",
        "| workload | threads | costream µs | anchor µs | window µs | anchor / costream "
        "(per-repeat range) | window / costream | target | met | other load |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        lat = r["latency"]
        cells = [f"{_us(lat[k]['median_us'])} ({_us(lat[k]['q1_us'])}-{_us(lat[k]['q3_us'])})"
                 for k in IMPLS]
        spread = r["ratio_spread"]["anchor_over_costream_per_repeat"]
        lines.append(
            f"| {r['workload']} | {r['threads']} | {' | '.join(cells)} | "
            f"{r['ratios']['anchor_over_costream']:.2f}x ({spread['min']:.2f}-{spread['max']:.2f})"
            f" | {r['ratios']['window_over_costream']:.2f}x | "
            f">= {r['target_anchor_over_costream']:g}x | {'yes' if r['target_met'] else 'NO'} | "
            f"{_cpus(r['other_processes_cpus'])}, {r['discarded_repeats']} redone |"
        )
    lines += [
        "",
        "MACs per step (multiply-accumulates of convolutions and matrix multiplications, "
        "`torch.utils.flop_counter` FLOPs / 2; element-wise work not included). Theoretical: "
        "one output frame of every layer of the offline model. costream and anchor: the mean "
        "of two consecutive steps (paired convs do a pair's work in k + 1 frame convolutions "
        "instead of 2k, unevenly between its steps). Window: the whole model on "
        "the window clip. State: bytes of the stream state after a full window of steps.",
        "",
        "| workload | delay | theoretical | costream | anchor | window | costream <= theoretical "
        "| costream state | anchor state |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, s in report["static"].items():
        mac = s["macs_per_step"]
        lines.append(
            f"| {name} | {s['delay']} | {_macs(mac['theoretical'])} | {_macs(mac['costream'])} | "
            f"{_macs(mac['anchor'])} ({mac['anchor'] / mac['theoretical']:.2f}x) | "
            f"{_macs(mac['window'])} | {'yes' if s['costream_macs_at_most_theoretical'] else 'NO'}"
            f" | {_bytes(s['state_bytes']['costream'])} | {_bytes(s['state_bytes']['anchor'])} |"
        )
    lines += ["", "Workloads:", ""]
    for name, s in report["static"].items():
        lines.append(f"- `{name}`: {s['description']}; anchor built with {s['anchor_build']}; "
                     f"{s['verified_outputs']} stepped outputs verified.")
    lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2],
                   help="torch thread counts to run (default: 1 2)")
    p.add_argument("--repeats", type=int, default=None,
                   help="interleaved repeats per workload and thread count "
                        "(default: per workload, 80-120; 3 with --quick)")
    p.add_argument("--workloads", nargs="+", choices=sorted(WORKLOADS), default=list(WORKLOADS),
                   help="workloads to run (default: all)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: few repeats and steps; writes core_quick.{json,md}")
    p.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                   help="before timing, wait up to SECONDS for other processes to leave the "
                        "CPUs idle for 5 s in a row (default: 0, do not wait)")
    p.add_argument("--max-other-load", type=float, default=0.25, metavar="CPUS",
                   help="discard and repeat a timing repeat during which other processes kept "
                        "more than CPUS busy (at most --repeats times; default 0.25; "
                        "negative: keep every repeat)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"),
                   help="output directory (default: benchmarks/results)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    raw = sys.argv[1:] if argv is None else argv
    command = shlex.join(["python", "benchmarks/core.py", *raw])
    report: dict[str, Any] = {"command": command, "machine": machine_facts(args.threads),
                              "static": {}, "results": []}
    t_start = time.perf_counter()
    built: dict[str, dict[str, Any]] = {}
    for name in args.workloads:
        w = WORKLOADS[name]
        model, clip = make_model(w)
        co_net = costream.continual(model)
        anchor, how = make_anchor(model)
        b = {"model": model, "clip": clip, "costream": co_net, "anchor": anchor}
        n_co = verify(f"{name}/costream", co_net, model, clip)
        n_an = verify(f"{name}/anchor", anchor, model, clip)
        static = measure_static(w, b)
        static.update(description=w.description, anchor_build=how,
                      verified_outputs=min(n_co, n_an))
        report["static"][name] = static
        built[name] = b
        print(f"[{name}] verified {n_co} costream and {n_an} anchor outputs; MACs/step "
              f"{static['macs_per_step']}", flush=True)
    if args.max_other_load is not None and args.max_other_load < 0:
        args.max_other_load = None
    if args.wait_quiet > 0:
        report["quiet_wait"] = wait_quiet(args.wait_quiet)
        print(f"quiet wait: {report['quiet_wait']}", flush=True)
    report["machine"]["date_utc"] = _utc_now()
    report["machine"]["loadavg_at_start"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    for threads in args.threads:
        for name in args.workloads:
            w = WORKLOADS[name]
            repeats = args.repeats or (3 if args.quick else w.repeats)
            res = run_workload(w, threads, repeats, args.quick, built[name],
                               args.max_other_load)
            report["results"].append(res)
            lat = res["latency"]
            print(f"[{name}, {threads} thr] " + ", ".join(
                f"{k} {lat[k]['median_us']:.1f} us" for k in IMPLS)
                + f"; anchor/costream {res['ratios']['anchor_over_costream']:.2f}x "
                f"(target {w.target:g}x); other load {_cpus(res['other_processes_cpus'])}",
                flush=True)
    waited = report.get("quiet_wait", {}).get("waited_s", 0.0)
    report["elapsed_s"] = time.perf_counter() - t_start - waited  # excluding the quiet wait
    report["machine"]["loadavg_at_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    write_report(args.out, "core_quick" if args.quick else "core", report, to_markdown(report))
    print(f"in {report['elapsed_s']:.0f} s")
    return report


if __name__ == "__main__":
    main()
