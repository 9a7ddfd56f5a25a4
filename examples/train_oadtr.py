"""Online action detection on THUMOS14-style features: train OadTR or CoOadTR, evaluate online.

The feature file is a pickle ``{video: {"rgb": (T, 2048), "flow": (T, 1024 | 2048),
"anno": (T, 22)}}`` (loaded with an allow-list: numpy arrays only). Videos whose name contains
"test" form the test set and the others the training set (THUMOS14 trains on its validation
videos), unless ``--split`` names a JSON file ``{"train": [...], "test": [...]}``.

1. **Training (offline, on windows).** Every video is preceded by ``window - 1`` zero frames,
   so each frame has a full window, and cut into chunks of ``outputs + window - 1`` frames; one
   ``forward`` call on a chunk yields the prediction for each of its last ``outputs`` frames
   (the output of the window ending there; for CoOadTR the newest token's), supervised with
   the frame's label by cross-entropy (multi-hot labels are normalised to a distribution).
   For CoOadTR ``outputs`` is a multiple of the recycling positional encoding's period, so a
   chunk's positions are those the frames get when the padded video is streamed.
2. **Evaluation (online).** Each test video is streamed through the model with
   ``forward_step``, one feature frame at a time; the softmax scores of all frames give the
   per-frame mAP (average precision per class over all frames, mean over the classes that have
   positives; the background class 0 is left out, as OadTR reports THUMOS14).
   ``--check`` also runs the offline ``forward`` on the same chunks as in training and reports
   the largest difference to the stepped scores.

Example::

    python examples/train_oadtr.py --features thumos_kinetics.pickle --model cooadtr_b2 \\
        --epochs 10 --out results.json

Small models for a quick run: ``--embed-dim 64 --heads 4 --mlp-dim 64 --window 16``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from costream.models import (
    ThumosFeatures,
    create_model,
    load_thumos_features,
    pad_start,
    per_frame_map,
)

MODELS = ("cooadtr_b1", "cooadtr_b2", "oadtr")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--features", type=Path, required=True, help="THUMOS14-style feature pickle")
    p.add_argument("--split", type=Path, help='JSON {"train": [videos], "test": [videos]}')
    p.add_argument("--model", choices=MODELS, default="cooadtr_b1")
    p.add_argument("--window", type=int, default=64, help="frames per window")
    p.add_argument("--embed-dim", type=int, default=1024)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--mlp-dim", type=int, default=1024)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--positions", type=int, help="CoOadTR: recycling period K (default window)")
    p.add_argument("--fixed-positions", action="store_true",
                   help="CoOadTR: fixed sinusoidal positions instead of learned ones")
    p.add_argument("--encoder-layers", type=int, default=3, help="OadTR encoder layers")
    p.add_argument("--decoder-layers", type=int, default=5, help="OadTR decoder layers")
    p.add_argument("--decoder-heads", type=int, default=4, help="OadTR decoder heads")
    p.add_argument("--queries", type=int, default=8, help="OadTR decoder queries")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=16, help="chunks per batch")
    p.add_argument("--outputs", type=int,
                   help="predictions per training chunk (default: K for CoOadTR, else window)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--ignore-classes", default="0",
                   help="classes left out of the mAP, comma-separated (THUMOS14: 0, or 0,21)")
    p.add_argument("--check", action="store_true",
                   help="compare the stepped scores with the offline forward")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    p.add_argument("--save-model", type=Path, help="save the trained state_dict here")
    p.add_argument("--save-scores", type=Path,
                   help="save the stepped logits per test video (.npz) here")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def progress(iterable: Any, quiet: bool, **kwargs: Any) -> Any:
    """A tqdm progress bar on stderr (plain iteration when quiet or without tqdm)."""
    if quiet:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, file=sys.stderr, dynamic_ncols=True, leave=False, **kwargs)


def split_videos(names: list[str], split: Path | None) -> tuple[list[str], list[str]]:
    if split is not None:
        spec = json.loads(split.read_text())
        return list(spec["train"]), list(spec["test"])
    test = [v for v in names if "test" in v]
    return [v for v in names if "test" not in v], test


def model_options(args: argparse.Namespace, data: ThumosFeatures) -> dict[str, Any]:
    opts = {"in_features": data.in_features, "num_classes": data.num_classes,
            "window": args.window, "embed_dim": args.embed_dim, "num_heads": args.heads,
            "mlp_dim": args.mlp_dim, "dropout": args.dropout}
    if args.model == "oadtr":
        opts.update(num_layers=args.encoder_layers, decoder_layers=args.decoder_layers,
                    decoder_heads=args.decoder_heads, decoder_mlp_dim=args.mlp_dim,
                    num_queries=args.queries)
    else:
        opts.update(num_positions=args.positions or args.window,
                    learned_positions=not args.fixed_positions)
    return opts


def chunk_outputs(args: argparse.Namespace) -> int:
    if args.model == "oadtr":
        return args.outputs or args.window
    period = args.positions or args.window
    outputs = args.outputs or period
    if outputs % period:
        raise SystemExit(f"--outputs ({outputs}) must be a multiple of the positional period "
                         f"({period}) for CoOadTR")
    return outputs


def soft_cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """Cross-entropy against (normalised) multi-hot targets; frames without labels are skipped."""
    mass = target.sum(-1)
    keep = mass > 0
    dist = target[keep] / mass[keep].unsqueeze(-1)
    return -(dist * F.log_softmax(logits[keep], -1)).sum(-1).mean()


def train(model: nn.Module, data: ThumosFeatures, args: argparse.Namespace) -> list[float]:
    xs, ys = data.chunks(args.window, chunk_outputs(args))
    device = torch.device(args.device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    gen = torch.Generator().manual_seed(args.seed)
    losses = []
    model.train()
    for _ in progress(range(args.epochs), args.quiet, desc="epochs"):
        total, count = 0.0, 0
        for idx in torch.randperm(len(xs), generator=gen).split(args.batch_size):
            x, y = xs[idx].to(device), ys[idx].to(device)
            logits = model(x).transpose(1, 2)  # (B, outputs, K)
            if not bool((y.sum(-1) > 0).any()):
                continue
            loss = soft_cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                      y.reshape(-1, y.shape[-1]))
            opt.zero_grad()
            loss.backward()
            opt.step()
            total, count = total + loss.item(), count + 1
        losses.append(total / max(1, count))
    model.eval()
    return losses


@torch.inference_mode()
def stream(model: nn.Module, features: Tensor, window: int, quiet: bool) -> Tensor:
    """Step ``model`` over one video (zero-padded at the start): logits ``(T, K)``."""
    padded = pad_start(features, window)
    model.reset_state()
    outs = []
    for t in progress(range(padded.shape[1]), quiet, desc="stream", unit="frame"):
        y = model.forward_step(padded[:, t].unsqueeze(0))
        if y is not None:
            outs.append(y[0])
    model.reset_state()
    return torch.stack(outs)


@torch.inference_mode()
def offline(model: nn.Module, features: Tensor, window: int, outputs: int) -> Tensor:
    """The offline ``forward`` over one video (zero-padded at the start), in chunks of
    ``outputs`` predictions as in training: logits ``(T, K)``."""
    padded = pad_start(features, window)
    parts = [model(padded[None, :, a: a + outputs + window - 1])[0]
             for a in range(0, features.shape[1], outputs)]
    return torch.cat(parts, 1).t()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    raw = load_thumos_features(args.features)
    train_names, test_names = split_videos(sorted(raw), args.split)
    if not train_names or not test_names:
        raise SystemExit(f"need training and test videos, got {len(train_names)} and "
                         f"{len(test_names)} (name test videos '*test*' or pass --split)")
    train_set, test_set = ThumosFeatures(raw, train_names), ThumosFeatures(raw, test_names)
    options = model_options(args, train_set)
    model = create_model(args.model, **options).to(args.device)

    start = time.perf_counter()
    losses = train(model, train_set, args)
    train_s = time.perf_counter() - start

    start = time.perf_counter()
    scores, labels, stepped, diffs = [], [], {}, []
    for name, (x, y) in zip(test_names, test_set):
        logits = stream(model, x.to(args.device), args.window, args.quiet)
        stepped[name] = logits.cpu().numpy()
        if args.check:
            ref = offline(model, x.to(args.device), args.window, chunk_outputs(args))
            diffs.append(float((ref - logits).abs().max()))
        scores.append(logits.softmax(-1).cpu())
        labels.append(y)
    frames = sum(len(s) for s in scores)
    stream_s = time.perf_counter() - start
    ignore = tuple(int(c) for c in args.ignore_classes.split(",") if c.strip())
    mean_ap, aps = per_frame_map(torch.cat(scores), torch.cat(labels), ignore=ignore)

    result = {
        "model": args.model, "options": options, "epochs": args.epochs,
        "train_videos": len(train_names), "test_videos": len(test_names),
        "test_frames": frames, "losses": losses, "train_s": train_s,
        "stream_ms_per_frame": 1e3 * stream_s / max(1, frames),
        "map": mean_ap, "ap_per_class": [None if np.isnan(a) else float(a) for a in aps],
        "ignored_classes": list(ignore),
        "max_abs_diff_online_offline": max(diffs) if diffs else None,
    }
    if args.save_model:
        torch.save(model.state_dict(), args.save_model)
    if args.save_scores:
        np.savez(args.save_scores, **stepped)
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    print(f"{args.model}: per-frame mAP {100 * mean_ap:.2f} % over {frames} test frames "
          f"({len(test_names)} videos), {result['stream_ms_per_frame']:.3f} ms per step")
    return result


if __name__ == "__main__":
    main()
