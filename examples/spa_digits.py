"""Structured Pruning Adapters at small scale: transfer learning on scikit-learn's digits.

A small CNN is pretrained on digits 0-4 (the source task). Models for digits 5-9 (the target
task) are then derived from it by

* full fine-tuning: every parameter learned, no pruning;
* fine-pruning: every parameter learned while channels are pruned;
* SPLoRA (ranks 4/8/16) and SPPaRA: the base is frozen; adapters, the adapted layers' biases,
  the batch norms and a new head are learned while the same pruning runs on the adapted
  network,

at densities 100/50/30/10 % (fraction of the base network's parameters kept), three seeds each.
Pruning is gradual: Taylor importance on target batches, a cubic schedule (Zhu & Gupta) of four
steps during the first epochs, then fine-tuning. Learned parameters are what the task's artifact
stores (:func:`costream.prune.task_storage`; masks are counted separately, in bits); MACs are
those of the deployed (merged, pruned) network for one 8x8 image.

The question is whether SPA's claim holds at this scale: SPLoRA at 30 % density within 2
accuracy points of fine-pruning while learning at least 5x fewer parameters.

Run (writes ``benchmarks/results/spa_digits.{json,md,png}``)::

    python examples/spa_digits.py

``--quick`` runs a tiny version end to end (for tests).
"""

from __future__ import annotations

import argparse
import copy
import json
import multiprocessing
import statistics
import sys
import time
from collections import OrderedDict
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from costream.prune import Pruner, count_macs, task_storage
from costream.prune.adapters import SPLoRAConfig, SPPaRAConfig, add_adapters, merge_adapters

ROOT = Path(__file__).resolve().parents[1]
COMMAND = "python examples/spa_digits.py"
CLAIM_DENSITY, CLAIM_GAP, CLAIM_RATIO = 0.3, 2.0, 5.0


# ---------------------------------------------------------------- data and model
def load_data(seed: int = 0) -> dict[str, tuple[Tensor, Tensor]]:
    """Source (0-4) train/test and target (5-9, relabelled 0-4) train/test splits."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0
    y = torch.tensor(digits.target, dtype=torch.long)
    out = {}
    for name, lo in (("source", 0), ("target", 5)):
        keep = (y >= lo) & (y < lo + 5)
        xi, yi = x[keep], y[keep] - lo
        a, b, c, d = train_test_split(xi.numpy(), yi.numpy(), test_size=0.5, random_state=seed,
                                      stratify=yi.numpy())
        out[f"{name}_train"] = (torch.from_numpy(a), torch.from_numpy(c))
        out[f"{name}_test"] = (torch.from_numpy(b), torch.from_numpy(d))
    return out


def make_cnn(classes: int = 5) -> nn.Sequential:
    """Four 3x3 conv blocks (32-64-64-128 channels), global average pool, linear head."""

    layers: list[tuple[str, nn.Module]] = []
    for i, (cin, cout) in enumerate(((1, 32), (32, 64), (64, 64), (64, 128)), start=1):
        layers += [(f"conv{i}", nn.Conv2d(cin, cout, 3, padding=1)),
                   (f"bn{i}", nn.BatchNorm2d(cout)), (f"relu{i}", nn.ReLU())]
        if i in (2, 3):
            layers.append((f"pool{i}", nn.MaxPool2d(2)))
    layers += [("gap", nn.AdaptiveAvgPool2d(1)), ("flat", nn.Flatten()),
               ("head", nn.Linear(128, classes))]
    return nn.Sequential(OrderedDict(layers))


def batches(x: Tensor, y: Tensor, size: int, gen: torch.Generator) -> list[tuple[Tensor, Tensor]]:
    order = torch.randperm(len(x), generator=gen)
    return [(x[order[i:i + size]], y[order[i:i + size]]) for i in range(0, len(x), size)]


@torch.no_grad()
def accuracy(model: nn.Module, data: tuple[Tensor, Tensor]) -> float:
    model.eval()
    x, y = data
    return float((model(x).argmax(1) == y).float().mean()) * 100.0


def pretrain(data: dict, epochs: int, seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = make_cnn()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(epochs):
        model.train()
        for xb, yb in batches(*data["source_train"], 32, gen):
            opt.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            opt.step()
    return model.eval()


# ---------------------------------------------------------------- densities
def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def channel_density_for(base: nn.Module, density: float, example: Tensor,
                        iterations: int = 14) -> float:
    """The channel density whose per-layer pruning keeps closest to ``density`` of the params."""
    if density >= 1.0:
        return 1.0
    total = param_count(base)
    lo, hi = 0.01, 1.0
    for _ in range(iterations):
        mid = (lo + hi) / 2
        net = copy.deepcopy(base)
        Pruner(net, example, "l1", mid).run()
        lo, hi = (mid, hi) if param_count(net) / total < density else (lo, mid)
    return hi


# ---------------------------------------------------------------- one derived task
def derive(base: nn.Module, data: dict, method: str, density: float, channel_density: float,
           rank: int | None, seed: int, opts: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = copy.deepcopy(base)
    model.head = nn.Linear(model.head.in_features, 5)  # a new head for the target classes
    adapters = method in ("splora", "sppara")
    saved = r"head|bn\d"  # learned in full and stored with the task (a few values per channel)
    if method == "splora":
        add_adapters(model, SPLoRAConfig(rank=rank, modules_to_save=saved))
    elif method == "sppara":
        add_adapters(model, SPPaRAConfig(modules_to_save=saved))
    lr = opts.adapter_lr if adapters else opts.lr
    x_train, y_train = data["target_train"]
    pruner = None
    if channel_density < 1.0:
        pruner = Pruner(model, x_train[:1], "taylor", channel_density, schedule="cubic",
                        steps=opts.prune_steps)
    prune_at = {opts.warmup + i * opts.prune_every for i in range(opts.prune_steps)}
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    for epoch in range(opts.epochs):
        if pruner is not None and epoch in prune_at and not pruner.finished:
            model.train()
            pruner.calibrate(batches(x_train, y_train, 64, gen)[:4], F.cross_entropy)
            pruner.step()
            opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
        model.train()
        for xb, yb in batches(x_train, y_train, opts.batch_size, gen):
            opt.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            opt.step()
    model.eval()
    storage = task_storage(model)
    deployed = merge_adapters(model) if adapters else model
    return {
        "method": method, "density": density, "rank": rank, "seed": seed,
        "channel_density": channel_density,
        "weight_density": param_count(deployed) / param_count(base),
        "accuracy": accuracy(deployed, data["target_test"]),
        "learned_params": storage.learned, "stored_buffers": storage.buffers,
        "mask_bits": storage.mask_bits,
        "macs": count_macs(deployed, data["target_test"][0][:1]),
    }


# ---------------------------------------------------------------- report
def summarise(runs: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["method"], r["density"], r["rank"]), []).append(r)
    rows = []
    for (method, density, rank), rs in groups.items():
        acc = [r["accuracy"] for r in rs]
        counts = ("learned_params", "stored_buffers", "mask_bits", "macs")
        rows.append({
            "method": method, "density": density, "rank": rank, "seeds": len(rs),
            "accuracy_mean": statistics.fmean(acc),
            "accuracy_std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
            "weight_density": statistics.fmean(r["weight_density"] for r in rs),
            **{k: round(statistics.fmean(r[k] for r in rs)) for k in counts},
        })
    return rows


def verdict(rows: list[dict]) -> dict[str, Any]:
    """Does SPLoRA at 30 % density come within 2 points of fine-pruning with >= 5x fewer params?"""
    fp = [r for r in rows if r["method"] == "fine-pruning" and r["density"] == CLAIM_DENSITY]
    spl = [r for r in rows if r["method"] == "splora" and r["density"] == CLAIM_DENSITY]
    if not fp or not spl:
        return {"holds": None, "text": "not evaluated (no 30 % density runs)", "per_rank": []}
    ref = fp[0]
    per_rank = []
    for r in sorted(spl, key=lambda r: r["rank"]):
        gap = ref["accuracy_mean"] - r["accuracy_mean"]
        ratio = ref["learned_params"] / r["learned_params"]
        per_rank.append({"rank": r["rank"], "accuracy_gap": gap, "param_ratio": ratio,
                         "holds": gap <= CLAIM_GAP and ratio >= CLAIM_RATIO})
    ok = [str(p["rank"]) for p in per_rank if p["holds"]]
    parts = [f"rank {p['rank']}: {-p['accuracy_gap']:+.2f} points vs fine-pruning "
             f"({ref['accuracy_mean']:.2f} %), {p['param_ratio']:.1f}x fewer learned parameters"
             for p in per_rank]
    head = (f"REPRODUCED at this scale for rank {', '.join(ok)}" if ok
            else "NOT REPRODUCED at this scale")
    text = f"{head}. Per rank: " + "; ".join(parts) + "."
    low = min(r["density"] for r in rows)
    fp_low = [r for r in rows if r["method"] == "fine-pruning" and r["density"] == low]
    spa_low = [r for r in rows if r["method"] in ("splora", "sppara") and r["density"] == low]
    if fp_low and spa_low:  # the paper's stronger claim: adapters beat fine-pruning when sparse
        best = max(spa_low, key=lambda r: r["accuracy_mean"])
        diff = best["accuracy_mean"] - fp_low[0]["accuracy_mean"]
        text += (f" At {low * 100:.0f} % density the best adapter ({LABELS[best['method']]}"
                 f"{' r' + str(best['rank']) if best['rank'] else ''}) is {diff:+.2f} points vs "
                 f"fine-pruning, so the paper's stronger finding (adapters more accurate than "
                 f"fine-pruning at high sparsity) is {'' if diff > 0 else 'not '}reproduced here.")
    return {"holds": bool(ok), "text": text, "per_rank": per_rank,
            "fine_pruning_accuracy": ref["accuracy_mean"],
            "fine_pruning_learned_params": ref["learned_params"]}


LABELS = {"full-ft": "full fine-tuning", "fine-pruning": "fine-pruning", "splora": "SPLoRA",
          "sppara": "SPPaRA"}


def write_markdown(path: Path, result: dict) -> None:
    lines = [
        "# Structured Pruning Adapters on digits (source 0-4 -> target 5-9)", "",
        f"Regenerate: `{result['command']}` ({result['seconds']:.0f} s on this machine: "
        f"{result['config']['jobs']} processes x {result['config']['threads']} thread).", "",
        f"Base CNN: {result['base']['params']} parameters, {result['base']['macs']} MACs per "
        f"image, source-task test accuracy {result['base']['source_accuracy']:.2f} %. Target: "
        f"{result['base']['target_train']} training / {result['base']['target_test']} test "
        f"images. Seeds {result['config']['seeds']}; mean +- standard deviation over seeds.", "",
        "Density = fraction of the base network's parameters kept (channels pruned per layer to "
        "the channel density that gives it). Learned params = values the task stores "
        "(adapters, biases, batch-norm affine parameters, the new head; all parameters for full "
        "fine-tuning and fine-pruning); stored buffers = batch-norm running statistics; masks "
        "are listed separately in bits (one per base channel of each pruned layer dimension). "
        "MACs: convolutions and linear layers of the deployed "
        "(merged) network, per 8x8 image.", "",
        "| method | density | rank | accuracy (%) | learned params | stored buffers | mask bits "
        "| weight density | MACs |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    order = list(LABELS)
    for r in sorted(result["summary"], key=lambda r: (-r["density"], order.index(r["method"]),
                                                      r["rank"] or 0)):
        lines.append(
            f"| {LABELS[r['method']]} | {r['density'] * 100:.0f} % | {r['rank'] or '-'} | "
            f"{r['accuracy_mean']:.2f} +- {r['accuracy_std']:.2f} | {r['learned_params']:,} | "
            f"{r['stored_buffers']:,} | {r['mask_bits']:,} | {r['weight_density'] * 100:.1f} % "
            f"| {r['macs']:,} |")
    v = result["verdict"]
    lines += ["", "## Verdict", "",
              f"Target: SPLoRA at {CLAIM_DENSITY * 100:.0f} % density within {CLAIM_GAP:.0f} "
              f"accuracy points of fine-pruning while learning at least {CLAIM_RATIO:.0f}x fewer "
              f"parameters.", "", f"**{v['text']}**", ""]
    c, base = result["config"], result["base"]
    cd = ", ".join(f"{d * 100:.0f} % -> {v:.3f}" for d, v in c["channel_densities"].items()
                   if d < 1.0)
    lines += [
        "## Setup", "",
        f"- Pretraining: {c['pretrain_epochs']} epochs, Adam 2e-3, batch 32, on half of the 0-4 "
        "images. Every derived model gets a new 5-way head.",
        f"- Derived models: {c['epochs']} epochs, batch {c['batch_size']}, Adam {c['lr']:g} "
        f"(full fine-tuning, fine-pruning) / {c['adapter_lr']:g} (adapters; base convolutions "
        "frozen, their biases, the batch norms and the head learned; batch-norm running "
        "statistics are stored with the task and counted as stored buffers).",
        f"- Pruning: Taylor |w g| on 4 target batches before each of {c['prune_steps']} cubic "
        f"steps, every {c['prune_every']} epochs from epoch {c['warmup']}; adapters are pruned "
        f"with their layers. Channel density per parameter density: {cd or '-'}.",
        "- Hyperparameters are one setting per method family, not tuned per density or rank."
        + (" The adapter learning rate was lowered from 1e-2 to 3e-3 after a first full run in "
        "which 1e-2 made some SPLoRA runs diverge (30 % density, rank 16: one seed at 49.8 %; "
        "10 % density, ranks 4 and 8: seeds at 78-88 %); that run's verdict was the same "
        "(ranks 4 and 8 within 1.3 points at 14-22x fewer parameters). Nothing else was tuned."
           if c["adapter_lr"] == 3e-3 else ""),
        f"- Scale caveat: {base['params']:,} base parameters and {base['target_train']} target "
        "training images, against ResNet-50 and ImageNet-scale sources in the paper; the target "
        "task is near ceiling for every method, so methods differ by about a point.",
    ]
    path.write_text("\n".join(lines) + "\n")


def write_plot(path: Path, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    markers = {"full-ft": "*", "fine-pruning": "s", "splora": "o", "sppara": "^"}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, marker in markers.items():
        rs = [r for r in rows if r["method"] == method]
        if not rs:
            continue
        ax.errorbar([r["learned_params"] for r in rs], [r["accuracy_mean"] for r in rs],
                    yerr=[r["accuracy_std"] for r in rs], fmt=marker, label=LABELS[method],
                    capsize=2, markersize=7)
        for r in rs:
            tag = f"{r['density'] * 100:.0f}%" + (f" r{r['rank']}" if r["rank"] else "")
            ax.annotate(tag, (r["learned_params"], r["accuracy_mean"]), fontsize=6,
                        xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("learned parameters per task (log scale)")
    ax.set_ylabel("target test accuracy (%)")
    ax.set_title("digits 0-4 -> 5-9: accuracy vs learned parameters (labels: density, rank)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a tiny run for smoke tests")
    p.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--densities", type=float, nargs="+", default=[1.0, 0.5, 0.3, 0.1])
    p.add_argument("--ranks", type=int, nargs="+", default=[4, 8, 16])
    p.add_argument("--pretrain-epochs", type=int, default=30)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--warmup", type=int, default=2, help="epochs before the first pruning step")
    p.add_argument("--prune-steps", type=int, default=4)
    p.add_argument("--prune-every", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate, all-parameter methods")
    p.add_argument("--adapter-lr", type=float, default=3e-3, help="learning rate, adapters")
    p.add_argument("--jobs", type=int, default=2, help="runs in parallel (processes)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.densities, args.ranks = [0], [1.0, 0.3], [4]
        args.pretrain_epochs, args.epochs, args.warmup, args.prune_steps = 2, 2, 0, 2
        args.prune_every, args.jobs = 1, 1
    return args


def plan(args: argparse.Namespace) -> list[tuple[str, float, int | None]]:
    """(method, density, rank) of every configuration; full fine-tuning is the 100 % baseline."""
    return [job for d in args.densities for job in (
        ("full-ft" if d == 1.0 else "fine-pruning", d, None),
        *(("splora", d, r) for r in args.ranks), ("sppara", d, None))]


def run_jobs(base: nn.Module, data: dict, cdens: dict, args: argparse.Namespace,
             start: float) -> list[dict]:
    """Every (method, density, rank, seed) run, ``--jobs`` processes at a time."""
    calls = [(base, data, m, d, cdens[d], r, s, args) for m, d, r in plan(args)
             for s in args.seeds]
    runs: list[Any] = [None] * len(calls)
    pool = None
    if args.jobs <= 1:
        results: Any = ((i, derive(*call)) for i, call in enumerate(calls))
    else:
        pool = ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=torch.set_num_threads, initargs=(args.threads,))
        futures = {pool.submit(derive, *call): i for i, call in enumerate(calls)}
        results = ((futures[f], f.result()) for f in as_completed(futures))
    for done, (i, r) in enumerate(results, start=1):
        runs[i] = r
        if not args.quiet:
            print(f"[{done}/{len(calls)}] {r['method']} density={r['density']} rank={r['rank']} "
                  f"seed={r['seed']}: {r['accuracy']:.1f} % ({time.perf_counter() - start:.0f} s)",
                  file=sys.stderr)
    if pool is not None:
        pool.shutdown()
    return runs


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    data = load_data()
    base = pretrain(data, args.pretrain_epochs, seed=1234)
    example = data["target_train"][0][:1]
    cdens = {d: channel_density_for(base, d, example, 6 if args.quick else 14)
             for d in args.densities}
    runs = run_jobs(base, data, cdens, args, start)
    rows = summarise(runs)
    seconds = time.perf_counter() - start
    result = {
        "command": COMMAND + (" --quick" if args.quick else ""),
        "seconds": seconds,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        | {"channel_densities": cdens, "criterion": "taylor",
           "schedule": f"cubic, {args.prune_steps} steps"},
        "base": {"params": param_count(base), "macs": count_macs(base, example),
                 "source_accuracy": accuracy(base, data["source_test"]),
                 "target_train": len(data["target_train"][1]),
                 "target_test": len(data["target_test"][1])},
        "runs": runs, "summary": rows, "verdict": verdict(rows),
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "spa_digits.json").write_text(json.dumps(result, indent=1) + "\n")
    write_markdown(args.out_dir / "spa_digits.md", result)
    write_plot(args.out_dir / "spa_digits.png", rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
