"""Decoder-LLM pruning study: a small Llama trained here, pruned by magnitude, Taylor and NIRVANA.

The model is the Llama-architecture decoder of ``examples/train_tiny_llm.py`` (trained offline on
the Python standard library's sources, cached; trained first if not cached). It is pruned with
:mod:`costream.prune.hf` at 20/30/50 % of its attention+MLP parameters (key/value groups with
their query heads, and SwiGLU neurons; widths multiples of 8, at least one key/value group per
layer) and measured on held-out files (perplexity over the first ``--eval-windows`` windows of
128 tokens of the held-out split).

Methods (global ranking over the layers in every case):

* ``magnitude``: ``|w|``, ``gamma = 1`` (groups and neurons removed at the same rate);
* ``magnitude g3``: ``|w|`` with NIRVANA's allocation ``gamma = 3``;
* ``taylor`` / ``nirvana``: first-order Taylor on the next-token loss / NIRVANA's saliency on the
  max-logit output, ``gamma = 3``, scored on the first candidate calibration set;
* ``taylor+KL`` / ``nirvana+KL``: the same with calibration selection (of ``--candidates``
  disjoint sets of calibration windows, keep the one whose pruned model has the lowest
  next-token KL divergence to the original on reference windows); ``nirvana+KL`` is NIRVANA as
  published;
* ``fluctuation``: FLAP's input-variance criterion (no bias compensation), ``gamma = 3``, first
  candidate set;
* ``... +heal``: ``magnitude g3``, ``taylor+KL`` and ``nirvana+KL`` healed with rank-8 LoRA
  distilling the original's next-token distributions on other calibration windows, merged.

Calibration, reference and healing windows come from the calibration files only; no method sees
the held-out files. Magnitude uses no data, so calibration selection does not apply to it.
Latency: greedy ``generate`` of ``--new-tokens`` tokens after a 32-token prompt, batch 1, one
thread, KV cache on, the original and the pruned model timed alternately; per generated token =
wall time / new tokens (the prompt's prefill included). For a model this small a generation step
is mostly Python overhead, so a forward of 8 windows of 128 tokens is timed too (compute-bound).

Usage::

    nice -n 10 python benchmarks/llm_pruning.py          # benchmarks/results/llm_pruning.*
    python benchmarks/llm_pruning.py --quick             # smoke run (llm_pruning_quick.*)
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from _common import OtherLoad, machine, write_report

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
import train_tiny_llm as tiny  # noqa: E402

from costream.prune.hf import (  # noqa: E402
    allocate_decoder,
    apply_decoder_plan,
    decoder_parameters,
    heal_decoder,
    load_decoder,
    perplexity,
    score_decoder,
    select_decoder_calibration,
)

SPARSITIES = (0.2, 0.3, 0.5)
# name -> (criterion, gamma, calibration selection)
METHODS = {
    "magnitude": ("magnitude", 1.0, False),
    "magnitude g3": ("magnitude", 3.0, False),
    "taylor": ("taylor", 3.0, False),
    "taylor+KL": ("taylor", 3.0, True),
    "nirvana": ("nirvana", 3.0, False),
    "nirvana+KL": ("nirvana", 3.0, True),
    "fluctuation": ("fluctuation", 3.0, False),
}
HEALED = ("magnitude g3", "taylor+KL", "nirvana+KL")
TIMED = ("magnitude", "nirvana+KL")


def _log(args: argparse.Namespace, start: float, message: str) -> None:
    if not args.quiet:
        print(f"[{time.perf_counter() - start:7.1f} s] {message}", flush=True)


def _batches(windows: torch.Tensor, size: int = 8) -> list[dict[str, torch.Tensor]]:
    return [{"input_ids": windows[i:i + size]} for i in range(0, len(windows), size)]


def splits(path: Path, cfg: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Candidate, reference and healing windows (calibration files), evaluation windows."""
    streams = tiny.load_streams(path, max_files=8 if args.quick else None)
    calib = tiny.windows(streams["calibration"], cfg.context)
    calib = calib[torch.randperm(len(calib), generator=torch.Generator().manual_seed(args.seed))]
    k, w = args.candidates, args.windows
    need = (k + 1) * w + args.heal_windows
    if len(calib) < need:
        raise SystemExit(f"the calibration split has {len(calib)} windows, {need} needed")
    return {"candidates": [_batches(calib[i * w:(i + 1) * w]) for i in range(k)],
            "reference": _batches(calib[k * w:(k + 1) * w]),
            "heal": _batches(calib[(k + 1) * w:need]),
            "eval": _batches(tiny.windows(streams["heldout"], cfg.context)[:args.eval_windows]),
            "prompt": streams["heldout"][-32:].unsqueeze(0)}


def prune(model: Any, data: dict[str, Any], method: str, sparsity: float) -> tuple[Any, Any]:
    criterion, gamma, select = METHODS[method]
    if select:
        choice = select_decoder_calibration(model, data["candidates"], data["reference"],
                                            sparsity, criterion, gamma)
        return choice.model, {"plan": choice.plan, "candidate": choice.index, "kl": choice.kl}
    batches = None if criterion == "magnitude" else data["candidates"][0]
    plan = allocate_decoder(model, score_decoder(model, criterion, batches), sparsity, gamma)
    return apply_decoder_plan(model, plan), {"plan": plan}


def _alternate(models: dict[str, Any], run: Any, repeats: int) -> dict[str, float]:
    """Median seconds of ``run(model)`` per model, the models timed alternately."""
    times: dict[str, list[float]] = {name: [] for name in models}
    names = list(models)
    for r in range(repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            t0 = time.perf_counter()
            run(models[name])
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def latency(original: Any, pruned: Any, prompt: torch.Tensor, new: int,
            repeats: int) -> dict[str, Any]:
    """Greedy generation (per generated token) and a forward of 8 x 128 tokens, original and
    pruned timed alternately; medians."""
    kwargs = {"max_new_tokens": new, "min_new_tokens": new, "do_sample": False,
              "pad_token_id": 0}
    models = {"original": original, "pruned": pruned}
    window = torch.randint(1, original.config.vocab_size, (8, 128),
                           generator=torch.Generator().manual_seed(0))
    meter = OtherLoad()
    with torch.inference_mode():
        for m in models.values():
            m.generate(prompt, **{**kwargs, "max_new_tokens": 2, "min_new_tokens": 2})
            m(input_ids=window)
        gen = _alternate(models, lambda m: m.generate(prompt, **kwargs), repeats)
        fwd = _alternate(models, lambda m: m(input_ids=window), repeats)
    return {"original_ms_per_token": 1e3 * gen["original"] / new,
            "pruned_ms_per_token": 1e3 * gen["pruned"] / new,
            "original_tokens_per_s": new / gen["original"],
            "pruned_tokens_per_s": new / gen["pruned"],
            "speedup": gen["original"] / gen["pruned"],
            "forward_original_ms": 1e3 * fwd["original"], "forward_pruned_ms": 1e3 * fwd["pruned"],
            "forward_speedup": fwd["original"] / fwd["pruned"],
            "other_load_cpus": meter.others()}


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    cfg = tiny.QUICK if args.quick else tiny.TrainConfig()
    path, train_info = tiny.load_or_train(cfg, args.cache, log=not args.quiet,
                                          max_files=8 if args.quick else None)
    model = load_decoder(path)
    data = splits(path, cfg, args)
    base_ppl = perplexity(model, data["eval"])
    _log(args, start, f"unpruned: held-out perplexity {base_ppl:.2f}")
    rows, timings = [], []
    for sparsity in args.sparsities:
        pruned_models = {}
        for method in METHODS:
            small, info = prune(model, data, method, sparsity)
            pruned_models[method] = small
            plan = info["plan"]
            row = {"sparsity": sparsity, "method": method, "removed": plan.sparsity,
                   "kv_heads": plan.widths()[0], "neurons": plan.widths()[1],
                   "params": sum(p.numel() for p in small.parameters()),
                   "decoder_params": decoder_parameters(small),
                   "perplexity": perplexity(small, data["eval"])}
            if "candidate" in info:
                row.update(candidate=info["candidate"], candidate_kl=info["kl"])
            rows.append(row)
            _log(args, start, f"{100 * sparsity:.0f} % {method}: perplexity "
                              f"{row['perplexity']:.2f}")
        for method in HEALED:
            healed = heal_decoder(pruned_models[method], model, data["heal"], rank=8,
                                  epochs=args.heal_epochs, lr=args.heal_lr)
            base = next(r for r in rows if r["sparsity"] == sparsity and r["method"] == method)
            rows.append({**base, "method": f"{method} +heal",
                         "perplexity": perplexity(healed, data["eval"])})
            _log(args, start, f"{100 * sparsity:.0f} % {method} +heal: perplexity "
                              f"{rows[-1]['perplexity']:.2f}")
        for method in TIMED:
            t = latency(model, pruned_models[method], data["prompt"], args.new_tokens,
                        args.repeats)
            timings.append({"sparsity": sparsity, "method": method, **t})
            _log(args, start, f"{100 * sparsity:.0f} % {method}: "
                              f"{t['pruned_ms_per_token']:.2f} vs "
                              f"{t['original_ms_per_token']:.2f} ms/token")
    return {"train": train_info, "model_dir": str(path), "context": cfg.context,
            "params": sum(p.numel() for p in model.parameters()),
            "decoder_params": decoder_parameters(model), "perplexity": base_ppl,
            "eval_tokens": sum(b["input_ids"].numel() for b in data["eval"]),
            "settings": {k: getattr(args, k) for k in (
                "candidates", "windows", "heal_windows", "heal_epochs", "heal_lr",
                "eval_windows", "new_tokens", "repeats", "seed")},
            "rows": rows, "latency": timings, "seconds": time.perf_counter() - start}


def verdict(report: dict[str, Any]) -> dict[str, Any]:
    """Does NIRVANA (saliency, gamma 3, KL selection) beat magnitude at every sparsity? Against
    plain magnitude (gamma 1) and against the better of the two magnitude variants; with the
    effects of the KL selection and of healing."""
    out = []
    for s in sorted({r["sparsity"] for r in report["rows"]}):
        ppl = {r["method"]: r["perplexity"] for r in report["rows"] if r["sparsity"] == s}
        best_mag = min(ppl["magnitude"], ppl["magnitude g3"])
        out.append({"sparsity": s, "nirvana+KL": ppl["nirvana+KL"], "nirvana": ppl["nirvana"],
                    "magnitude": ppl["magnitude"], "magnitude g3": ppl["magnitude g3"],
                    "best_magnitude": best_mag, "beats": ppl["nirvana+KL"] < best_mag,
                    "beats_plain_magnitude": ppl["nirvana+KL"] < ppl["magnitude"],
                    "kl_selection_change": ppl["nirvana+KL"] - ppl["nirvana"],
                    "healing_change": ppl["nirvana+KL +heal"] - ppl["nirvana+KL"]})
    return {"per_sparsity": out, "holds": all(o["beats"] for o in out),
            "holds_against_plain_magnitude": all(o["beats_plain_magnitude"] for o in out)}


def to_markdown(report: dict[str, Any]) -> str:
    tr, st = report["train"], report["settings"]
    lines = [
        "# Decoder-LLM pruning study (tiny Llama trained on the stdlib sources)", "",
        f"Command: `{report['command']}` ({report['seconds']:.0f} s, {report['threads']} "
        f"thread(s), CPU {report['machine']['cpu_model']}, load average at start "
        f"{report['machine']['loadavg_at_start'][0]:.1f}).", "",
        f"Model: {report['params'] / 1e6:.2f} M parameters ({report['decoder_params'] / 1e6:.2f}"
        f" M in attention+MLP), trained {tr['seconds'] / 60:.0f} min on one thread "
        f"({tr['steps']} steps, {tr['tokens_seen']:,} tokens seen, "
        f"{tr['tokens']['train']:,} training tokens). Held-out perplexity "
        f"{report['perplexity']:.2f} on {report['eval_tokens']:,} tokens; unigram baseline "
        f"{tr['unigram_perplexity']:.1f}.", "",
        f"Calibration: {st['candidates']} candidate sets of {st['windows']} windows of "
        f"{report['context']} tokens"
        f" (plus {st['windows']} reference windows for the KL selection); healing: rank-8 LoRA,"
        f" {st['heal_epochs']} epochs over {st['heal_windows']} other calibration windows, Adam "
        f"lr {st['heal_lr']:g}. Held-out windows: {st['eval_windows']}.", "",
        "| removed | method | attn+MLP removed | KV heads per layer | MLP neurons per layer "
        "| held-out perplexity | x unpruned |", "|---:|---|---:|---|---|---:|---:|"]
    for r in report["rows"]:
        lines.append(f"| {100 * r['sparsity']:.0f} % | {r['method']} | "
                     f"{100 * r['removed']:.1f} % | {r['kv_heads']} | {r['neurons']} | "
                     f"{r['perplexity']:.2f} | {r['perplexity'] / report['perplexity']:.2f} |")
    lines += ["", "## Generation latency (greedy, batch 1, KV cache)", "",
              "| removed | method | ms / token (pruned) | ms / token (unpruned) | tokens/s "
              "(pruned) | tokens/s (unpruned) | speedup | forward 8x128 (pruned / unpruned, ms)"
              " | forward speedup | other load (CPUs) |",
              "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for t in report["latency"]:
        other = t["other_load_cpus"]
        lines.append(f"| {100 * t['sparsity']:.0f} % | {t['method']} | "
                     f"{t['pruned_ms_per_token']:.2f} | {t['original_ms_per_token']:.2f} | "
                     f"{t['pruned_tokens_per_s']:.1f} | {t['original_tokens_per_s']:.1f} | "
                     f"{t['speedup']:.2f}x | {t['forward_pruned_ms']:.1f} / "
                     f"{t['forward_original_ms']:.1f} | {t['forward_speedup']:.2f}x | "
                     f"{'n/a' if other is None else f'{other:.2f}'} |")
    v = report["verdict"]
    plain = "yes" if v["holds_against_plain_magnitude"] else "no"
    lines += ["", "## Verdict", "",
              f"NIRVANA (saliency, gamma 3, KL calibration selection) beats plain magnitude "
              f"(gamma 1) at every sparsity: **{plain}**; beats the better of magnitude with "
              f"gamma 1 and gamma 3 at every sparsity: "
              f"**{'yes' if v['holds'] else 'no'}**.", "",
              "| removed | nirvana+KL | nirvana (first set) | magnitude | magnitude g3 | "
              "beats both magnitudes | KL selection (ppl change) | healing (ppl change) |",
              "|---:|---:|---:|---:|---:|---|---:|---:|"]
    for o in v["per_sparsity"]:
        lines.append(f"| {100 * o['sparsity']:.0f} % | {o['nirvana+KL']:.2f} | "
                     f"{o['nirvana']:.2f} | {o['magnitude']:.2f} | {o['magnitude g3']:.2f} | "
                     f"{'yes' if o['beats'] else 'no'} | {o['kl_selection_change']:+.2f} | "
                     f"{o['healing_change']:+.2f} |")
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in sorted({r["method"] for r in report["rows"]}, key=str):
        pts = sorted((r["sparsity"], r["perplexity"]) for r in report["rows"]
                     if r["method"] == method)
        style = "--" if method.endswith("+heal") else "-"
        ax.plot([100 * s for s, _ in pts], [p for _, p in pts], style, marker="o", label=method)
    ax.axhline(report["perplexity"], color="k", lw=0.8, label="unpruned")
    ax.set_yscale("log")
    ax.set_xlabel("attention+MLP parameters removed (%)")
    ax.set_ylabel("held-out perplexity")
    ax.legend(fontsize=7, ncol=2)
    ax.set_title("Tiny Llama (stdlib sources): held-out perplexity after pruning")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--candidates", type=int, default=3, help="candidate calibration sets")
    p.add_argument("--windows", type=int, default=8, help="windows per calibration set")
    p.add_argument("--heal-windows", type=int, default=40)
    p.add_argument("--heal-lr", type=float, default=3e-3)
    p.add_argument("--heal-epochs", type=int, default=2)
    p.add_argument("--eval-windows", type=int, default=48)
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--repeats", type=int, default=5, help="timed generations per model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", type=Path, default=None, help="trained-model cache directory")
    p.add_argument("--quick", action="store_true", help="smoke run (llm_pruning_quick.*)")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--render", type=Path, default=None, metavar="JSON",
                   help="rewrite the table, verdict and plot of a saved report (no measuring)")
    args = p.parse_args(argv)
    if args.render is not None:
        import json

        report = json.loads(args.render.read_text())
        report["verdict"] = verdict(report)
        stem = args.render.stem
        plot(report, args.out / f"{stem}.png")
        write_report(args.out, stem, report, to_markdown(report))
        return report
    raw = sys.argv[1:] if argv is None else argv
    args.sparsities = SPARSITIES
    if args.quick:
        args.sparsities = (0.3,)
        args.candidates, args.windows, args.heal_windows, args.heal_epochs = 2, 2, 4, 1
        args.eval_windows, args.new_tokens, args.repeats = 4, 4, 1
    import transformers

    info = machine(transformers=transformers.__version__)
    report = run(args)
    report = {"command": shlex.join(["python", "benchmarks/llm_pruning.py", *raw]),
              "machine": info, "threads": args.threads, **report}
    report["machine"]["loadavg_at_end"] = os.getloadavg()
    report["verdict"] = verdict(report)
    stem = "llm_pruning_quick" if args.quick else "llm_pruning"
    args.out.mkdir(parents=True, exist_ok=True)
    plot(report, args.out / f"{stem}.png")
    report["plot"] = f"{stem}.png"
    write_report(args.out, stem, report, to_markdown(report))
    return report


if __name__ == "__main__":
    main()
