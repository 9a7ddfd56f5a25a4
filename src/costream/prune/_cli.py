"""``costream prune``: prune a model built by a Python function and save the result.

Example::

    costream prune mypkg.models:build --criterion l1 --density 0.5 --schedule one-shot \\
        --example-input-shape 1,3,16,32,32 --out pruned.pt

``MODULE:FUNCTION`` is imported (the working directory is importable) and called with no
arguments; it returns the model. The pruned model is saved whole with ``torch.save`` (its layer
shapes differ from what the function builds; load it with ``torch.load(path,
weights_only=False)`` from a trusted source only). A JSON report (parameters and MACs before and
after, the density reached) goes to stdout, or to ``--report``.

Gradient criteria (``taylor``, ``fisher``) have no labels here: they score channels against the
mean squared output on ``--calibration-batches`` batches of standard-normal inputs.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core import CoModule
from ._criteria import CRITERIA


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``prune`` subcommand's arguments to ``parser``."""
    parser.add_argument("model", help="MODULE:FUNCTION returning the model to prune")
    parser.add_argument("--criterion", choices=sorted(CRITERIA), default="l1",
                        help="channel importance criterion (default l1)")
    parser.add_argument("--density", type=float, default=0.5,
                        help="fraction of channels to keep (default 0.5)")
    parser.add_argument("--schedule", choices=("one-shot", "linear", "cubic"),
                        default="one-shot", help="pruning schedule (default one-shot)")
    parser.add_argument("--steps", type=int, default=1,
                        help="pruning steps of a linear or cubic schedule (default 1)")
    parser.add_argument("--global", dest="global_pruning", action="store_true",
                        help="rank the channels of all layers together")
    parser.add_argument("--round-to", type=int, default=1,
                        help="keep a multiple of this many channels per layer (default 1)")
    parser.add_argument("--example-input-shape", required=True,
                        help="comma-separated input shape, e.g. 1,3,16,32,32")
    parser.add_argument("--calibration-batches", type=int, default=4,
                        help="random batches for gradient criteria (default 4)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--out", required=True, type=Path, help="where to save the pruned model")
    parser.add_argument("--report", type=Path, default=None,
                        help="write the JSON report here instead of stdout")


def _factory(spec: str) -> Any:
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"model must be MODULE:FUNCTION, got {spec!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(
            f"--example-input-shape must be comma-separated ints, got {text!r}") from None
    if not shape or any(v < 1 for v in shape):
        raise ValueError(f"--example-input-shape must be positive ints, got {text!r}")
    return shape


def _measure(model: nn.Module, x: torch.Tensor) -> dict[str, int]:
    from ._accounting import count_macs, step_macs

    out = {"params": sum(p.numel() for p in model.parameters()), "macs": count_macs(model, x)}
    if isinstance(model, CoModule):
        out["step_macs"] = step_macs(model, x)
    return out


def run(args: argparse.Namespace) -> int:
    """Run ``costream prune`` with parsed ``args``; return the exit status."""
    try:
        from ._pruner import Pruner
    except ImportError as e:
        print(f"costream prune needs the 'prune' extra (pip install 'costream[prune]'): {e}",
              file=sys.stderr)
        return 2
    from .._cli_util import check_writable

    check_writable(args.out, "--out")  # before anything runs (raises the CLI's UsageError)
    check_writable(args.report, "--report")
    try:
        shape = _shape(args.example_input_shape)
        build = _factory(args.model)
    except (ValueError, ImportError, AttributeError) as e:
        print(f"costream prune: {e}", file=sys.stderr)
        return 2
    torch.manual_seed(args.seed)
    model = build()
    if not isinstance(model, nn.Module):
        print(f"costream prune: {args.model} returned {type(model).__name__}, not a module",
              file=sys.stderr)
        return 2
    model.eval()
    x = torch.randn(shape)
    before = _measure(model, x)
    try:
        pruner = Pruner(model, x, args.criterion, args.density, schedule=args.schedule,
                        steps=args.steps, global_pruning=args.global_pruning,
                        round_to=args.round_to)
    except ValueError as e:
        print(f"costream prune: {e}", file=sys.stderr)
        return 2
    batches = [(torch.randn(shape), None) for _ in range(args.calibration_batches)]
    report = None
    while not pruner.finished:
        pruner.calibrate(batches, lambda y, _: y.pow(2).mean())
        report = pruner.step()
    model.eval()
    after = _measure(model, x)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model, args.out)
    summary = {
        "model": args.model, "criterion": args.criterion, "density": args.density,
        "schedule": args.schedule, "steps": args.steps, "global": args.global_pruning,
        "channel_density": report.density if report else 1.0,
        "before": before, "after": after, "out": str(args.out),
    }
    text = json.dumps(summary, indent=2)
    if args.report is not None:
        args.report.write_text(text + "\n")
    else:
        print(text)
    return 0
