"""Markdown page of the sweep benchmark (``sweep.py``)."""

from __future__ import annotations

from typing import Any

NAMES = {"tcn": "TCN", "cnn3d": "3D CNN", "transformer": "Transformer"}


def _us(v: float) -> str:
    return f"{v:,.0f}" if v >= 100 else f"{v:.1f}"


def _macs(v: float) -> str:
    return f"{v / 1e9:.2f} G" if v >= 1e9 else (f"{v / 1e6:.2f} M" if v >= 1e6
                                                 else f"{v / 1e3:.1f} K")


def _check(c: dict[str, Any], dense: bool) -> str:
    if c["costream_vs_anchor"] is None:
        text = "no anchor"
    else:
        text = f"{c['costream_vs_anchor']:.1e}" + ("" if c["equals_anchor"] else " (differs)")
    if "costream_vs_model" in c:
        text += f"; vs model {c['costream_vs_model']:.1e}"
        if "anchor_vs_model" in c:
            text += f" (anchor {c['anchor_vs_model']:.1e})"
    return text + ("; dense anchor" if dense else "")


def _anchor_macs(st: dict[str, Any]) -> str:
    a = st.get("anchor_macs")
    return "-" if a is None else f"{a / st['macs']:.1f}x"


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def to_markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        "# Sweep: costream vs continual-inference vs sliding window on drawn workloads", "",
        f"Command: `{report['command']}`", "",
        *[line for n in report.get("notes", []) for line in (n, "")],
        *([] if report.get("complete") else [
            f"**Partial run: {len(report['rows'])} workloads measured; the run was stopped "
            "or is still going. Rates (peaks) from the start of the run only.**", ""]),
        f"Machine: {m['cpu_model']}, {m['logical_cpus']} logical CPUs; torch {m['torch']}, "
        f"continual-inference {m['continual_inference']}, costream {m['costream']}, Python "
        f"{m['python']}; load average at start {m['loadavg_at_start']}; {m['date_utc']} UTC; "
        f"{report['elapsed_s']:.0f} s. Workloads drawn with seed {report['seed']}; batch 1, "
        "float32, eval, `torch.inference_mode()`.", "",
        "Peaks measured in this run: " + "; ".join(
            f"{t} thread(s): GEMM {p['gemm_gmacs']:.1f} GMAC/s, copy bandwidth "
            f"{p['bandwidth_gbs']:.1f} GB/s" for t, p in report["peaks"].items()) + ".", "",
        "## Per family: anchor / costream (eager `forward_step`; in brackets the fastest "
        "backend)", "",
        "| family | threads | workloads (without anchor) | median | worst | median (best "
        "backend) | worst (best backend) | ceiling: median (worst) | target median | met (and "
        "no workload < 3x) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, s in report["summary"].items():
        fam, t = key.split("/")
        lines.append(f"| {NAMES[fam]} | {t} | {s['workloads']} ({s['without_anchor']}) | "
                     f"{s['median']:.2f}x | "
                     f"{s['worst']:.2f}x | {s['median_best_backend']:.2f}x | "
                     f"{s['worst_best_backend']:.2f}x | {s['median_ceiling']:.2f}x "
                     f"({s['worst_ceiling']:.2f}x) | {s['target']:g}x | "
                     f"{'yes' if s['met'] else 'NO'} |")
    backends = [b for b in report["backends"] if b != "eager"]
    lines += [
        "", "Ceiling: anchor time / costream's roofline floor, the largest ratio over the anchor "
        "that any implementation of costream's step (its MACs and bytes) could reach on this "
        "machine. Where the median ceiling is below a target, the target cannot be met by "
        "making the step faster, only by doing less arithmetic per step. This holds for "
        "compute-bound steps (all 3D CNNs here); for memory-bound steps whose bytes stay in "
        "the caches the floor, taken at DRAM bandwidth, is too high and the ceiling too low "
        "(floor % above 100).", "",
    ]
    lines += [
        "", "## Per workload", "",
        "Latency: median µs per step, each sample the mean of two consecutive steps (a "
        "paired conv's steps alternate between k frame convolutions and one), implementations "
        "interleaved in blocks (order rotating). "
        "costream = eager `forward_step`; " + ", ".join(backends) + " = costream's exported "
        "step (`make_step`). MACs: per costream step (in brackets: the anchor's per step, "
        "relative; both the mean of two steps). GMAC/s: MACs per step / costream's eager "
        "step. Floor: "
        "max(MACs / peak GEMM rate, bytes / bandwidth) (bytes: parameters once, state read "
        "and written, frame, output); floor % = floor / fastest costream step. Per layer: "
        "(fastest step - floor) / conv, linear and attention layers: the fixed cost per "
        "layer that bounds steps far from the floor. Check: max abs difference of "
        "costream's stepped outputs from the anchor's (and, for Transformers, from the torch "
        "encoder on each window); dense anchor: the anchor holds dilated kernels densely "
        "(continual-inference has no temporal dilation); no anchor: continual-inference "
        "1.2.4 cannot build a TransformerEncoder of more than 2 layers (an assertion in its "
        "RetroactiveLambda), so those encoders are compared with the window and the torch "
        "model only.", "",
        "| workload | threads | costream | anchor | window | " + " | ".join(backends)
        + " | anchor / costream | window / costream | best | anchor / best | MACs (anchor's) "
        "| GMAC/s "
        "| floor µs (bound) | floor % | ceiling | per layer µs | other load | check |",
        "|---|---|---|---|---|" + "---|" * len(backends) + "---|---|---|---|---|---|---|---"
        "|---|---|---|---|",
    ]
    for r in report["rows"]:
        for t, res in r["timing"].items():
            lat = res["latency_us"]
            cells = " | ".join(_us(lat[k]) if k in lat else "-"
                               for k in ["costream", "anchor", "window", *backends])
            lines.append(
                f"| {r['name']} | {t} | {cells} | {_x(res['anchor_over_costream'])} | "
                f"{res['window_over_costream']:.2f}x | {res['best_backend']} | "
                f"{_x(res['anchor_over_best'])} | {_macs(r['static']['macs'])} "
                f"({_anchor_macs(r['static'])}) | "
                f"{res['gmacs_costream']:.1f} | {_us(res['floor_us'])} ({res['floor_bound']}) "
                f"| {100 * res['floor_fraction']:.0f} % | {_x(res.get('ceiling'))} | "
                f"{res['overhead_per_layer_us']:.1f} | "
                f"{res['other_processes_cpus'] or 0:.2f} | "
                f"{_check(r['check'], r['dense_anchor'])} |")
    lines += _below_floor(report)
    lines += ["", "## Workloads", ""]
    for r in report["rows"]:
        p = ", ".join(f"{k}={v}" for k, v in r["params"].items())
        lines.append(f"- `{r['name']}` ({NAMES[r['family']]}): {p}; "
                     f"{r['static']['layers']} layers, parameters "
                     f"{r['static']['param_bytes'] / 2**20:.2f} MiB, state "
                     f"{r['static']['state_bytes'] / 2**10:.1f} KiB.")
    return "\n".join(lines) + "\n"


#: Fraction of the roofline floor a step should reach (issue: at least 25 %, or the report
#: names what bounds it).
FLOOR_TARGET = 0.25


def _below_floor(report: dict[str, Any]) -> list[str]:
    """Per step below :data:`FLOOR_TARGET` of its floor: what bounds it, from the time of the
    same layers at 4 channels (``skeleton_us``, measured in the run)."""
    rows = [(r, t, res) for r in report["rows"] for t, res in r["timing"].items()
            if res["floor_fraction"] < FLOOR_TARGET]
    if not rows:
        return []
    out = ["", f"## Steps below {100 * FLOOR_TARGET:.0f} % of their roofline floor", "",
           "What bounds them: the same network at 4 channels (3D CNNs: 8 x 8 frames, "
           "Transformers: 2 dimensions per head), stepped eagerly in the same run, has the "
           "workload's layers, kernels and window but almost no arithmetic; its step time is "
           "the fixed cost of stepping those layers (Python, dispatch, per-call kernel set-up).",
           ""]
    for r, t, res in rows:
        best = res["best_backend"]
        fastest = res["latency_us"][best]
        line = (f"- `{r['name']}`, {t} thread(s): fastest step {_us(fastest)} µs ({best}), "
                f"floor {_us(res['floor_us'])} µs ({100 * res['floor_fraction']:.0f} %)")
        share = res.get("skeleton_fraction")  # skeleton / fastest step (sweep.derive)
        if share is None:
            out.append(line + "; not measured in this run.")
            continue
        line += (f"; its skeleton ({r['static']['layers']} layers, almost no arithmetic) "
                 f"steps in {_us(res['skeleton_us'])} µs, {100 * share:.0f} % of it: ")
        if share >= 0.5:
            line += "bounded by the fixed cost per layer, not by arithmetic or memory."
        else:
            line += ("the fixed cost per layer explains that share; the rest is arithmetic "
                     "and memory traffic running below the roofline rates.")
        out.append(line)
    return out

