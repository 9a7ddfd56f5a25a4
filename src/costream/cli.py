"""The ``costream`` console script: a thin layer over the public API.

Subcommands register themselves in ``_COMMANDS`` with a function that adds their arguments and
one that runs them.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

Command = tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]
_COMMANDS: list[Command] = []


def command(name: str, help_text: str):
    """Register a subcommand: decorate ``run(args) -> exit code``; set ``run.add_arguments``."""

    def decorate(run: Callable[[argparse.Namespace], int]):
        _COMMANDS.append((name, getattr(run, "add_arguments", lambda p: None), run))
        run.help_text = help_text
        return run

    return decorate


def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--frames", type=int, default=64, help="frames to stream (default 64)")


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(frames=args.frames)
    return 0


_demo.add_arguments = _demo_args
command("demo", "convert a small network, stream it frame by frame and check exactness")(_demo)


def load_model(spec: str):
    """A model from a zoo name (``costream.models``) or ``package.module:function``."""
    import importlib

    import torch

    from .convert import continual

    if ":" in spec:
        mod_name, fn_name = spec.split(":", 1)
        model = getattr(importlib.import_module(mod_name), fn_name)()
    else:
        try:
            from .models import create_model
        except ImportError as err:
            raise SystemExit(f"unknown model {spec!r}: give package.module:function") from err
        model = create_model(spec)
    if not isinstance(model, torch.nn.Module):
        raise SystemExit(f"{spec} did not return a torch.nn.Module")
    return continual(model).eval()


def _shape(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(","))


def _export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="zoo model name or package.module:function")
    p.add_argument("--onnx", required=True, help="output .onnx path (manifest: <path>.json)")
    p.add_argument("--frame-shape", type=_shape, required=True,
                   help="one input frame without batch, e.g. 3,160,160")
    p.add_argument("--batch-size", type=int, default=1)


def _export(args: argparse.Namespace) -> int:
    from .export import export_onnx

    net = load_model(args.model)
    manifest = export_onnx(net, args.onnx, args.frame_shape, batch_size=args.batch_size)
    print(f"wrote {args.onnx} (+ .json): {len(manifest['state'])} state tensors, "
          f"{manifest['frames_per_call']} frame(s) per call, delay {manifest['delay']}")
    return 0


_export.add_arguments = _export_args
command("export", "export a continual model's step to ONNX with a state manifest")(_export)


def _verify_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("onnx", help="an .onnx file written by `costream export`")
    p.add_argument("model", help="the model it was exported from (name or module:function)")
    p.add_argument("--frames", type=int, default=None,
                   help="frames to stream (default: twice the receptive field)")
    p.add_argument("--atol", type=float, default=1e-4)


def _verify(args: argparse.Namespace) -> int:
    import json
    import time

    import torch

    from .export import OnnxStreamRunner

    net = load_model(args.model)
    manifest = json.loads(open(args.onnx + ".json").read())
    s = manifest["stride"]
    frames = args.frames or 2 * manifest["receptive_field"] + s
    frames -= frames % s
    shape = manifest["frame_shape"]
    clip = torch.randn(manifest["batch_size"], shape[0], frames, *shape[1:])
    with torch.no_grad():
        expected = [y for y in (net.forward_step(clip[:, :, t]) for t in range(frames))
                    if y is not None]
    runner = OnnxStreamRunner(args.onnx)
    t0 = time.perf_counter()
    got = runner.run(clip.numpy())
    per_call = (time.perf_counter() - t0) / (frames // s) * 1e3
    if len(got) != len(expected):
        print(f"FAIL: {len(got)} outputs from ONNX, {len(expected)} from PyTorch")
        return 1
    diff = max((float(abs(torch.from_numpy(a) - b).max()) for a, b in zip(got, expected,
                                                                            strict=True)),
               default=0.0)
    ok = diff <= args.atol
    print(f"{'OK' if ok else 'FAIL'}: {len(got)} outputs, max |onnx - pytorch| = {diff:.2e}, "
          f"{per_call:.2f} ms per call")
    return 0 if ok else 1


_verify.add_arguments = _verify_args
command("verify", "run an exported model in onnxruntime from a fresh state and compare")(
    _verify)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``costream`` console script."""
    parser = argparse.ArgumentParser(prog="costream", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    runners = {}
    for name, add_arguments, run in _COMMANDS:
        p = sub.add_parser(name, help=getattr(run, "help_text", None))
        add_arguments(p)
        runners[name] = run
    args = parser.parse_args(argv)
    return runners[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
