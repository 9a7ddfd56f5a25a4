"""Stream a video file through a continual 3D CNN and print its top-5 labels for every frame.

Frames are decoded with PyAV (``pip install av``, or ``pip install costream[models]``), resized
and centre-cropped, and fed to ``model.forward_step`` one at a time; once the network's delay has
passed, every frame yields a Kinetics-400 prediction covering the last ``head_pool`` frames
(Co3D, arXiv 2106.00050). Without ``--checkpoint`` the weights are random.

Usage::

    python examples/stream_video.py --model cox3d_s --video clip.mp4
    python examples/stream_video.py --model cox3d_s --video clip.mp4 --checkpoint X3D_S.pyth \\
        --head-pool 64

Each output line: ``frame <index> <latency ms> <label> (<probability>) ...``.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F

from costream.models import create_model, kinetics400_classes

MEAN = (0.45, 0.45, 0.45)  # PyTorchVideo's Kinetics normalisation
STD = (0.225, 0.225, 0.225)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="cox3d_s", help="a continual zoo model (cox3d_*, ...)")
    parser.add_argument("--video", required=True, help="video file to stream")
    parser.add_argument("--checkpoint", help="PyTorchVideo / PySlowFast .pyth weights")
    parser.add_argument("--head-pool", type=int, help="frames the prediction averages over")
    parser.add_argument("--crop-size", type=int, help="input size (default: the model's)")
    parser.add_argument("--temporal-fill", choices=("zeros", "replicate"), default="zeros")
    parser.add_argument("--max-frames", type=int, help="stop after this many frames")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    return parser.parse_args(argv)


def frames(path: str, av_module) -> Iterator[torch.Tensor]:
    """Decoded RGB frames as ``(3, H, W)`` uint8 tensors."""
    with av_module.open(path) as container:
        for frame in container.decode(video=0):
            yield torch.from_numpy(frame.to_ndarray(format="rgb24")).permute(2, 0, 1)


def preprocess(frame: torch.Tensor, size: int) -> torch.Tensor:
    """Resize the short side to ``size``, centre-crop, normalise: ``(1, 3, size, size)``."""
    x = frame.unsqueeze(0).float().div_(255)
    h, w = x.shape[2:]
    scale = size / min(h, w)
    x = F.interpolate(x, size=(max(size, round(h * scale)), max(size, round(w * scale))),
                      mode="bilinear", align_corners=False)
    top, left = (x.shape[2] - size) // 2, (x.shape[3] - size) // 2
    x = x[:, :, top: top + size, left: left + size]
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous()


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import av
    except ImportError:
        print("stream_video needs PyAV to decode videos: pip install av "
              "(or pip install 'costream[models]')", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    options = {"temporal_fill": args.temporal_fill}
    if args.head_pool:
        options["head_pool"] = args.head_pool
    if args.crop_size:
        options["crop_size"] = args.crop_size
    model = create_model(args.model, checkpoint=args.checkpoint, **options)
    if not getattr(model, "streamable", True):
        print(f"{args.model} cannot be stepped (clip-scope SE); use its continual version, "
              f"e.g. co{args.model}", file=sys.stderr)
        return 2
    size = model.crop_size
    labels = kinetics400_classes()
    softmax = getattr(model.head, "activation", None) is None
    print(f"{args.model}: first prediction after {model.delay + 1} frames, one every "
          f"{model.temporal.stride} frame(s), each over {model.head_pool} frames")
    with torch.inference_mode():
        for i, frame in enumerate(frames(args.video, av)):
            if args.max_frames is not None and i >= args.max_frames:
                break
            x = preprocess(frame, size)
            start = time.perf_counter()
            y = model.forward_step(x)
            ms = (time.perf_counter() - start) * 1e3
            if y is None:
                print(f"frame {i:5d} {ms:7.1f} ms  (warming up)")
                continue
            probs = y.softmax(dim=1)[0] if softmax else y[0]
            top = probs.topk(5)
            text = "  ".join(f"{labels[j]} ({p:.3f})" for p, j in zip(top.values, top.indices))
            print(f"frame {i:5d} {ms:7.1f} ms  {text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
