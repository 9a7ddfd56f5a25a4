"""Plots of ``costream bench`` results (matplotlib, imported only when plotting)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["plot_bench"]


def plot_bench(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Plot :func:`run_bench` results into ``path`` (PNG, PDF or SVG, by suffix).

    Three panels: latency of the offline clip and of one continual step against the window
    length (frames the offline network recomputes per prediction; solid: offline, dashed:
    continual step), the measured speedup against the window length, and the MAC reduction
    against the measured speedup (one point per model; on the dotted diagonal the speedup
    equals the MAC reduction). Window sweeps come from ``run_bench(window_factors=...)``;
    without them each model is one point at its clip length.

    Needs matplotlib (the ``bench`` or ``study`` extra).

    Example:
        >>> import os, tempfile
        >>> from costream.bench import plot_bench
        >>> row = {"model": "tcn", "clip_frames": 21, "clip_ms": 5.0, "step_ms": 0.5,
        ...        "speedup": 10.0, "mac_reduction": 21.0}
        >>> out = plot_bench([row], os.path.join(tempfile.mkdtemp(), "bench.png"))
        >>> out.stat().st_size > 0
        True
    """
    import matplotlib

    if matplotlib.get_backend().lower() not in ("agg", "pdf", "svg"):
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    path = Path(path)
    fig, (ax_lat, ax_speed, ax_mac) = plt.subplots(1, 3, figsize=(15, 4.6))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, row in enumerate(rows):
        colour = colours[i % len(colours)]
        windows = row.get("windows") or [{"frames": row["clip_frames"], "clip_ms": row["clip_ms"],
                                          "step_ms": row["step_ms"]}]
        windows = sorted(windows, key=lambda w: w["frames"])
        frames = [w["frames"] for w in windows]
        ax_lat.plot(frames, [w["clip_ms"] for w in windows], "o-", color=colour,
                    label=row["model"])
        ax_lat.plot(frames, [w["step_ms"] for w in windows], "s--", color=colour)
        ax_speed.plot(frames, [w["clip_ms"] / w["step_ms"] for w in windows], "o-",
                      color=colour, label=row["model"])
        ax_mac.scatter(row["mac_reduction"], row["speedup"], color=colour, label=row["model"])
        ax_mac.annotate(row["model"], (row["mac_reduction"], row["speedup"]), fontsize=8,
                        xytext=(4, 4), textcoords="offset points")
    ax_lat.set(xscale="log", yscale="log", xlabel="window length (frames)",
               ylabel="latency (ms)", title="offline clip (solid) vs continual step (dashed)")
    ax_speed.set(xscale="log", yscale="log", xlabel="window length (frames)",
                 ylabel="speedup (clip latency / step latency)", title="measured speedup")
    values = [1.0, *(r["mac_reduction"] for r in rows), *(r["speedup"] for r in rows)]
    lo, hi = min(values) / 1.5, max(values) * 1.5
    ax_mac.plot([lo, hi], [lo, hi], ":", color="grey", label="speedup = MAC reduction")
    ax_mac.set(xscale="log", yscale="log", xlim=(lo, hi), ylim=(lo, hi),
               xlabel="MAC reduction (MACs per clip / MACs per step)",
               ylabel="measured speedup", title="MAC reduction vs measured speedup")
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    for ax in (ax_lat, ax_speed, ax_mac):
        ax.grid(True, which="both", alpha=0.3)
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_formatter(plain)
            axis.set_minor_formatter(NullFormatter())
    ax_lat.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
