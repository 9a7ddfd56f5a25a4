"""Continual inference end to end: train offline on clips, run online over a long stream.

The data are "moving digits" videos made from scikit-learn's bundled 8x8 digits (see
``_moving_digits_data.py``): the action is the digit and the direction it moves in (40 classes),
and in a long stream the action changes every 30-80 frames. A small X3D-style network built
from costream layers (3D convolutions with temporal kernel 3 and no temporal padding,
depthwise-separable residual blocks, a head that averages the last 4 frames) is

1. trained offline on single-action clips with ordinary ``forward`` calls (a couple of minutes
   on a CPU; the weights are cached, so a rerun skips this);
2. run online over a long stream of unseen digit images with ``forward_step``, one frame at a
   time, yielding a prediction for every frame once its receptive field is filled;
3. checked: the stepped predictions equal the offline network run over the whole stream, the
   online per-frame accuracy is measured (not counting the frames within one receptive field
   after each action change, where the window still holds the previous action), and the time
   of one step is compared with recomputing the sliding window.

Run (writes ``benchmarks/results/moving_digits.{md,json}``)::

    python examples/moving_digits.py

``--quick`` trains briefly and streams a short video (end-to-end smoke run, written to
``moving_digits_quick.*``); ``--retrain`` ignores the cached weights; ``--cache DIR`` sets where
they are kept (default ``$COSTREAM_CACHE`` or ``~/.cache/costream``).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import platform
import statistics
import sys
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import costream as cs
from costream.bench import ptflops_macs, ptflops_step_macs

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _moving_digits_data import (
    NUM_CLASSES,
    clip_batch,
    describe_class,
    load_split,
    make_stream,
)

ROOT = Path(__file__).resolve().parents[1]
COMMAND = "python examples/moving_digits.py"
TARGET = 90.0
VERSION = 2  # bump when the data or the network changes (invalidates cached weights)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """What the cached weights depend on."""

    width: int = 24
    head_pool: int = 4
    iterations: int = 1200
    batch_size: int = 32
    extra_frames: int = 3  # clip length = receptive field + extra_frames (outputs per clip)
    lr: float = 5e-3
    seed: int = 0

    def key(self) -> str:
        text = json.dumps({**dataclasses.asdict(self), "data": VERSION}, sort_keys=True)
        return hashlib.sha1(text.encode()).hexdigest()[:12]


# ---------------------------------------------------------------- the network
def wrap_pad(x: Tensor) -> Tensor:
    """Pad the last two (spatial) dimensions by one pixel, wrapping around (the canvas is a
    torus). Works on a frame ``(B, C, H, W)`` and on a clip ``(B, C, T, H, W)`` alike."""
    x = torch.cat([x[..., -1:, :], x, x[..., :1, :]], dim=-2)
    return torch.cat([x[..., -1:], x, x[..., :1]], dim=-1)


def block(c_in: int, c_out: int, stride: int, expand: int = 2) -> cs.Sequential:
    """X3D-style residual block: 1x1x1 expand, depthwise 3x3x3 (temporal kernel 3, unpadded in
    time), SiLU, 1x1x1 project; the shortcut is aligned with the newest frame."""
    inner = c_in * expand
    main = cs.Sequential(OrderedDict(
        conv_a=cs.Conv3d(c_in, inner, 1, bias=False), bn_a=nn.BatchNorm3d(inner),
        act_a=nn.ReLU(),
        wrap=cs.Lambda(wrap_pad),
        conv_b=cs.Conv3d(inner, inner, 3, stride=(1, stride, stride), groups=inner, bias=False),
        bn_b=nn.BatchNorm3d(inner), act_b=nn.SiLU(),
        conv_c=cs.Conv3d(inner, c_out, 1, bias=False), bn_c=nn.BatchNorm3d(c_out),
    ))
    shortcut = None
    if stride != 1 or c_in != c_out:
        shortcut = cs.Sequential(OrderedDict(
            conv=cs.Conv3d(c_in, c_out, 1, stride=(1, stride, stride), bias=False),
            bn=nn.BatchNorm3d(c_out)))
    return cs.Sequential(OrderedDict(res=cs.Residual(main, shortcut, align="end"),
                                     act=nn.ReLU()))


def build_net(cfg: TrainConfig) -> cs.Sequential:
    """Stem (3x3x3), three residual blocks (spatial strides 2, 2, 1), head (1x1x1, average
    over the last ``head_pool`` frames, linear classifier). Continual by construction."""
    w = cfg.width
    return cs.Sequential(OrderedDict(
        stem=cs.Sequential(OrderedDict(
            wrap=cs.Lambda(wrap_pad),
            conv=cs.Conv3d(1, w // 2, 3, bias=False), bn=nn.BatchNorm3d(w // 2),
            act=nn.ReLU())),
        res2=block(w // 2, w, 2),
        res3=block(w, 2 * w, 2),
        res4=block(2 * w, 2 * w, 1),
        head=cs.Sequential(OrderedDict(
            conv=cs.Conv3d(2 * w, 8 * w, 1, bias=False), bn=nn.BatchNorm3d(8 * w),
            act=nn.ReLU(),
            pool=cs.AdaptiveAvgPool3d((1, 1, 1), window=cfg.head_pool),
            fc=cs.Linear(8 * w, NUM_CLASSES),
            flatten=cs.Reshape(-1))),
    ))


# ---------------------------------------------------------------- offline training
def train(net: nn.Module, cfg: TrainConfig, log: bool) -> dict[str, Any]:
    """Train on random single-action clips of training images; every output of a clip (one
    per window position) is supervised with the clip's class."""
    train_set, _ = load_split(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    torch.manual_seed(cfg.seed)
    frames = net.receptive_field + cfg.extra_frames
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.iterations,
                                                pct_start=0.15)
    net.train()
    t0 = time.perf_counter()
    recent: list[float] = []
    for it in range(cfg.iterations):
        x, y = clip_batch(train_set, cfg.batch_size, frames, rng)
        out = net(x)  # (B, classes, extra_frames + 1)
        loss = F.cross_entropy(out, y[:, None].expand(-1, out.shape[2]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        recent = [*recent[-49:], float((out.argmax(1) == y[:, None]).float().mean())]
        if log and (it + 1) % 100 == 0:
            print(f"  iteration {it + 1}/{cfg.iterations}: loss {loss.item():.3f}, clip "
                  f"accuracy (last 50 batches) {100 * statistics.mean(recent):.1f} %, "
                  f"{time.perf_counter() - t0:.0f} s", flush=True)
    net.eval()
    return {"seconds": time.perf_counter() - t0, "final_loss": float(loss.detach()),
            "train_clip_accuracy": 100 * statistics.mean(recent), "clip_frames": frames,
            "threads": torch.get_num_threads()}


def load_or_train(cfg: TrainConfig, cache: Path, retrain: bool,
                  log: bool) -> tuple[cs.Sequential, dict[str, Any]]:
    """The trained network, from the cache when present (``torch.load(weights_only=True)``)."""
    net = build_net(cfg)
    path = cache / f"moving_digits-{cfg.key()}.pt"
    if path.exists() and not retrain:
        saved = torch.load(path, weights_only=True)
        net.load_state_dict(saved["state_dict"])
        info = dict(saved["train"], cached=str(path))
        if log:
            print(f"loaded trained weights from {path}")
        return net.eval(), info
    if log:
        print(f"training offline: {cfg.iterations} iterations of {cfg.batch_size} clips")
    info = train(net, cfg, log)
    cache.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": net.state_dict(), "train": info}, path)
    return net, dict(info, cached=None)


# ---------------------------------------------------------------- online evaluation
def _median_us(fn: Any, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def run_online(net: cs.Sequential, frames: int, seed: int) -> dict[str, Any]:
    """Stream a long video of test images through ``forward_step`` and evaluate it."""
    _, test_set = load_split(seed)
    stream = make_stream(test_set, frames, np.random.default_rng(seed + 1))
    video, labels = stream.video, stream.labels
    rf, delay = net.receptive_field, net.delay
    preds = torch.full((frames,), -1, dtype=torch.long)
    stepped, step_s = [], []
    net.reset_state()
    with torch.inference_mode():
        for t in range(frames):
            frame = video[:, :, t]
            t0 = time.perf_counter()
            y = net.forward_step(frame)
            step_s.append(time.perf_counter() - t0)
            if y is not None:
                stepped.append(y)
                preds[t] = int(y.argmax(1))
        net.reset_state()
        offline = net(video)  # the offline network over the same stream
    stepped_logits = torch.stack(stepped, dim=2)
    expected = offline[:, :, : stepped_logits.shape[2]]
    diff = (stepped_logits - expected).abs()
    exact = bool((diff <= 1e-5 + 1e-4 * expected.abs()).all())
    same_preds = bool((stepped_logits.argmax(1) == expected.argmax(1)).all())

    t_idx = torch.arange(frames)
    changes = torch.tensor(stream.changes)
    since_change = t_idx - changes[torch.searchsorted(changes, t_idx, right=True) - 1]
    has_pred = preds >= 0
    settled = has_pred & (since_change >= rf)
    correct = preds == labels
    recovery = []
    for start, end in zip(stream.changes, [*stream.changes[1:], frames]):
        hits = torch.nonzero(correct[start:end]).flatten()
        if len(hits):
            recovery.append(int(hits[0]))

    window_frames = video[:, :, frames // 2 - rf: frames // 2]
    with torch.inference_mode():
        window_us = _median_us(lambda: net(window_frames), 200)
        step_macs = ptflops_step_macs(net, video[:, :, 0])
        window_macs = ptflops_macs(net, window_frames)
    steady = step_s[delay + 1:]
    return {
        "frames": frames, "segments": len(stream.changes), "receptive_field": rf,
        "delay": delay,
        "accuracy_settled": 100 * float(correct[settled].float().mean()),
        "frames_settled": int(settled.sum()),
        "accuracy_all": 100 * float(correct[has_pred].float().mean()),
        "frames_with_prediction": int(has_pred.sum()),
        "digit_accuracy_settled": 100 * float(((preds // 4) == (labels // 4))[settled]
                                              .float().mean()),
        "direction_accuracy_settled": 100 * float(((preds % 4) == (labels % 4))[settled]
                                                  .float().mean()),
        "median_frames_to_first_correct": statistics.median(recovery) if recovery else None,
        "max_abs_diff": float(diff.max()), "exact": exact, "same_predictions": same_preds,
        "outputs_compared": int(stepped_logits.shape[2]),
        "step_us": statistics.median(steady) * 1e6, "window_us": window_us,
        "step_macs": step_macs, "window_macs": window_macs,
        "example": [describe_class(int(v)) for v in labels[stream.changes[:3]]],
    }


# ---------------------------------------------------------------- report
def to_markdown(result: dict[str, Any]) -> str:
    """The result as the Markdown page committed under ``benchmarks/results``."""
    o, tr, cfg = result["online"], result["train"], result["config"]
    threads = result["environment"]["threads"]
    verdict = "reached" if o["accuracy_settled"] >= TARGET else "NOT reached"
    trained = (f"loaded from the cache (trained in {tr['seconds']:.0f} s)" if tr.get("cached")
               else f"{tr['seconds']:.0f} s")
    return "\n".join([
        "# Moving digits: trained offline, run online",
        "",
        f"Regenerate: `{result['command']}` ({result['seconds']:.0f} s on this machine, "
        f"{threads} thread{'s' if threads != 1 else ''}; training {trained}).",
        "",
        "Stream: scikit-learn digits (test images, unseen in training) moving one pixel per "
        "frame on a 16x16 torus; action = digit x direction (40 classes); the action changes "
        f"every 30-80 frames ({o['segments']} segments, {o['frames']} frames). "
        f"Network: X3D-style, {result['params']:,} parameters, receptive field "
        f"{o['receptive_field']} frames, a prediction per frame (delay {o['delay']}). "
        f"Training: {cfg['iterations']} iterations of {cfg['batch_size']} clips of "
        f"{tr['clip_frames']} frames (AdamW, one-cycle, max lr {cfg['lr']}), seed "
        f"{cfg['seed']}.",
        "",
        "| measure | value |",
        "|---|---|",
        f"| online per-frame accuracy, excluding {o['receptive_field']} frames after each "
        f"change | **{o['accuracy_settled']:.2f} %** ({o['frames_settled']} frames) |",
        f"| online per-frame accuracy, all frames with a prediction | {o['accuracy_all']:.2f} % "
        f"({o['frames_with_prediction']} frames) |",
        f"| digit / direction accuracy (excluding transitions) | "
        f"{o['digit_accuracy_settled']:.2f} % / {o['direction_accuracy_settled']:.2f} % |",
        f"| median frames from a change to the first correct prediction | "
        f"{o['median_frames_to_first_correct']} |",
        f"| max \\|step - offline\\| over the stream (logits) | {o['max_abs_diff']:.2e} "
        f"({'within' if o['exact'] else 'NOT within'} float32 tolerance; "
        f"{'identical' if o['same_predictions'] else 'different'} predictions, "
        f"{o['outputs_compared']} outputs) |",
        f"| one step (`forward_step`) | {o['step_us']:.0f} µs, {o['step_macs'] / 1e6:.2f} M MACs |",
        f"| recomputing the {o['receptive_field']}-frame sliding window | "
        f"{o['window_us']:.0f} µs, {o['window_macs'] / 1e6:.2f} M MACs |",
        f"| speedup of stepping (latency / MACs) | {o['window_us'] / o['step_us']:.1f}x / "
        f"{o['window_macs'] / o['step_macs']:.1f}x |",
        "",
        f"Target: at least {TARGET:.0f} % online per-frame accuracy outside transitions: "
        f"**{verdict}** ({o['accuracy_settled']:.2f} %).",
        "",
        "MACs in the ptflops convention (`costream.bench`); latencies are medians, batch 1, "
        "float32, under `torch.inference_mode()`.",
        "",
    ])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="short training and stream (smoke run)")
    p.add_argument("--steps", type=int, default=None,
                   help="frames of the online stream (default 3000; 400 with --quick)")
    p.add_argument("--iterations", type=int, default=None,
                   help="training iterations (default 1200; 80 with --quick)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--cache", type=Path, default=None,
                   help="directory for trained weights (default $COSTREAM_CACHE or "
                        "~/.cache/costream)")
    p.add_argument("--retrain", action="store_true", help="ignore cached weights")
    p.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--quiet", action="store_true", help="print only the result table")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    iterations = args.iterations or (80 if args.quick else TrainConfig.iterations)
    cfg = TrainConfig(iterations=iterations, seed=args.seed)
    cache = args.cache or Path(os.environ.get("COSTREAM_CACHE",
                                              Path.home() / ".cache" / "costream"))
    net, train_info = load_or_train(cfg, cache, args.retrain, log=not args.quiet)
    frames = args.steps or (400 if args.quick else 3000)
    if not args.quiet:
        print(f"streaming {frames} frames online, one forward_step per frame")
    online = run_online(net, frames, args.seed)
    options = [("--quick", args.quick), ("--steps", args.steps),
               ("--iterations", args.iterations), ("--seed", args.seed or None),
               ("--threads", args.threads)]
    command = COMMAND + "".join(f" {flag}" if value is True else f" {flag} {value}"
                                for flag, value in options if value)
    result = {
        "command": command, "config": dataclasses.asdict(cfg),
        "params": sum(p.numel() for p in net.parameters()), "train": train_info,
        "online": online, "target_accuracy": TARGET,
        "reached": online["accuracy_settled"] >= TARGET,
        "seconds": time.perf_counter() - t0,
        "environment": {"torch": torch.__version__, "python": platform.python_version(),
                        "threads": torch.get_num_threads(), "cpu_count": os.cpu_count()},
    }
    name = "moving_digits_quick" if args.quick else "moving_digits"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    markdown = to_markdown(result)
    (args.out_dir / f"{name}.md").write_text(markdown)
    print(markdown)
    return result


if __name__ == "__main__":
    main()
