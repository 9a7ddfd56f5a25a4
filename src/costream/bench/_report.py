"""Output of ``costream bench`` results: an aligned table, Markdown, JSON and CSV."""

from __future__ import annotations

import csv
import io
import json
import os
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = ["COLUMNS", "NOTES", "environment", "format_table", "to_csv", "to_json", "to_markdown"]

#: Columns of the printed table: (title, result key).
COLUMNS: tuple[tuple[str, str], ...] = (
    ("model", "model"), ("params", "params"), ("clip", "clip_frames"),
    ("MACs/clip", "macs_clip"), ("MACs/step", "macs_step"), ("MAC reduction", "mac_reduction"),
    ("ms/clip", "clip_ms"), ("ms/step", "step_ms"), ("speedup", "speedup"),
    ("state", "state_bytes"), ("max |step - offline|", "max_abs_diff"),
)


def _si(v: float, unit: str = "") -> str:
    for scale, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= scale:
            return f"{v / scale:.2f} {prefix}{unit}".rstrip()
    return f"{v:.0f} {unit}".rstrip()


def _bytes(v: float) -> str:
    for scale, unit in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if v >= scale:
            return f"{v / scale:.1f} {unit}"
    return f"{v:.0f} B"


def _ms(v: float) -> str:
    return f"{v:.3f}" if v < 1 else f"{v:.2f}" if v < 100 else f"{v:.0f}"


def _cell(key: str, row: dict[str, Any]) -> str:
    v = row[key]
    if key in ("params", "macs_clip", "macs_step"):
        return _si(v)
    if key in ("mac_reduction", "speedup"):
        return f"{v:.1f}x"
    if key in ("clip_ms", "step_ms"):
        return _ms(v)
    if key == "state_bytes":
        return _bytes(v)
    if key == "max_abs_diff":  # with a step backend, the larger of its and eager's
        v = max(v, row.get("backend_max_abs_diff") or 0.0)
        return f"{v:.1e} {'ok' if row['exact'] else 'FAIL'}"
    return str(v)


def format_table(rows: Sequence[dict[str, Any]], *, markdown: bool = False) -> str:
    """The results as an aligned table (one row per model, the columns of :data:`COLUMNS`).

    With ``markdown=True`` the ``|`` inside cells are escaped, so the table renders as
    Markdown.

    Example:
        >>> from costream.bench import format_table
        >>> row = {"model": "tcn", "params": 1_967_360, "clip_frames": 21,
        ...        "macs_clip": 2.1e8, "macs_step": 1.97e6, "mac_reduction": 106.6,
        ...        "clip_ms": 5.2, "step_ms": 0.31, "speedup": 16.8, "state_bytes": 20480,
        ...        "max_abs_diff": 3e-7, "exact": True}
        >>> print(format_table([row]).splitlines()[2])
        | tcn   | 1.97 M | 21   | 210.00 M  | 1.97 M    | 106.6x        | 5.20    | 0.310   | 16.8x   | 20.0 KiB | 3.0e-07 ok           |
    """  # noqa: E501
    header = [title for title, _ in COLUMNS]
    body = [[_cell(key, r) for _, key in COLUMNS] for r in rows]
    if markdown:
        header = [h.replace("|", "\\|") for h in header]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h)
              for i, h in enumerate(header)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), rule, *(line(b) for b in body)])


NOTES = (
    "MACs: ptflops convention (multiply-accumulates of convolutions and linear layers plus one "
    "per element for norms, activations, pooling and element-wise arithmetic); MACs/step is a "
    "steady-state `forward_step`, averaged over a stride period. ms: medians under "
    "`torch.inference_mode()`; ms/clip is `forward` on the clip (frames in the clip column). "
    "Speedup = ms/clip / ms/step; MAC reduction = MACs/clip / MACs/step. State: bytes of the "
    "stream state (`get_state()[\"tree\"]`). max |step - offline|: the stepped outputs against "
    "`forward` over the same stream (a little longer than the receptive field); ok = every "
    "output within float32 tolerance (|d| <= 1e-5 + 1e-4 |offline|)."
)


def backend_note(rows: Sequence[dict[str, Any]]) -> str:
    """``", steps by <backend>"`` where the timed steps ran on another backend than eager
    (their outputs are checked too: max |step - offline| is the larger difference)."""
    backend = next((r.get("backend") for r in rows if r.get("backend")), "eager")
    return "" if backend == "eager" else f", steps by {backend} (checked against forward too)"


def to_markdown(rows: Sequence[dict[str, Any]], path: str | Path | None = None, *,
                command: str | None = None, seconds: float | None = None) -> str:
    """The results as a Markdown page (command, machine, table, notes); written to ``path``.

    Example:
        >>> from costream.bench import to_markdown
        >>> row = {"model": "tcn", "params": 1_967_360, "clip_frames": 21, "macs_clip": 2.1e8,
        ...        "macs_step": 1.97e6, "mac_reduction": 106.6, "clip_ms": 5.2, "step_ms": 0.31,
        ...        "speedup": 16.8, "state_bytes": 20480, "max_abs_diff": 3e-7, "exact": True,
        ...        "batch_size": 1, "threads": 2, "device": "cpu"}
        >>> page = to_markdown([row], command="costream bench tcn")
        >>> page.splitlines()[2]
        'Command: `costream bench tcn`'
    """
    env = environment()
    loads = [r["other_load"] for r in rows if r.get("other_load") is not None]
    load = (f"; other processes kept {max(loads):.2f} CPUs busy at most (per model)"
            if loads else "")
    first = rows[0] if rows else {}
    total = f"; {seconds:.0f} s in total" if seconds is not None else ""
    exact = all(r["exact"] for r in rows)
    lines = [
        "# costream bench: continual models against their offline computation",
        "",
        f"Command: `{command or 'costream bench'}`",
        "",
        f"Machine: {env['processor']}, {env['cpu_count']} CPUs{load}. Torch {env['torch']}, "
        f"costream {env['costream']}, Python {env['python']}. Device "
        f"{first.get('device', '?')}, threads {first.get('threads', '?')}, batch "
        f"{first.get('batch_size', '?')}, float32, random weights{backend_note(rows)}{total}.",
        "",
        format_table(rows, markdown=True),
        "",
        NOTES.replace("|", "\\|"),
        "",
        f"Exact (within float32 tolerance) for every row: **{'yes' if exact else 'NO'}**.",
        "",
    ]
    text = "\n".join(lines)
    if path is not None:
        Path(path).write_text(text)
    return text


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what :mod:`platform` knows.

    Example:
        >>> from costream.bench._report import cpu_model
        >>> isinstance(cpu_model(), str)
        True
    """
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def environment() -> dict[str, Any]:
    """Versions and machine facts recorded with benchmark results.

    Example:
        >>> from costream.bench._report import environment
        >>> sorted(environment())[:3]
        ['costream', 'cpu_count', 'machine']
    """
    from .._version import __version__

    return {"costream": __version__, "torch": torch.__version__,
            "python": platform.python_version(), "machine": platform.machine(),
            "processor": cpu_model(),
            "cpu_count": os.cpu_count(), "threads": torch.get_num_threads()}


def to_json(rows: Sequence[dict[str, Any]], path: str | Path | None = None, *,
            command: str | None = None) -> str:
    """The results (and :func:`environment`) as JSON; written to ``path`` when given.

    Example:
        >>> import json
        >>> from costream.bench import to_json
        >>> json.loads(to_json([{"model": "tcn", "speedup": 12.5}]))["results"][0]["speedup"]
        12.5
    """
    doc = {"command": command, "environment": environment(), "results": list(rows)}
    text = json.dumps(doc, indent=2, default=str) + "\n"
    if path is not None:
        Path(path).write_text(text)
    return text


_CSV_KEYS = ("model", "params", "clip_frames", "receptive_field", "delay", "stride",
             "macs_clip", "macs_step", "mac_reduction", "clip_ms", "step_ms", "speedup",
             "state_bytes", "max_abs_diff", "exact", "batch_size", "threads", "device",
             "other_load")


def to_csv(rows: Sequence[dict[str, Any]], path: str | Path | None = None) -> str:
    """The results as CSV (one line per model, raw numbers); written to ``path`` when given.

    Example:
        >>> from costream.bench import to_csv
        >>> print(to_csv([{"model": "tcn", "speedup": 12.5}]).splitlines()[1][:12])
        tcn,,,,,,,,,
    """
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(_CSV_KEYS), extrasaction="ignore",
                            lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: r.get(k, "") for k in _CSV_KEYS})
    text = buf.getvalue()
    if path is not None:
        Path(path).write_text(text)
    return text
