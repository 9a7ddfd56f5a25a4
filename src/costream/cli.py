"""The ``costream`` console script: a thin layer over the public API.

Subcommands register themselves in ``_COMMANDS`` with a function that adds their arguments and
one that runs them. A user error is one line on stderr and exit status 2 (``--debug`` shows the
traceback); any other failure is one line and exit status 1.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from ._cli_util import (
    ArgumentParser,
    UsageError,
    check_writable,
    device,
    frame_errors,
    load_model,
    one_line,
    positive_int,
    probe_frames,
    user_errors,
)
from ._cli_util import shape as _shape

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
    p.add_argument("--frames", type=positive_int, default=64,
                   help="frames to stream (default 64)")


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(frames=args.frames)
    return 0


_demo.add_arguments = _demo_args
command("demo", "convert a small network, stream it frame by frame and check exactness")(_demo)


def _model_options(p: argparse.ArgumentParser, window: bool = True) -> None:
    p.add_argument("--trust", action="store_true",
                   help="a file written by `costream convert` names the function that builds "
                        "it: import and run it (only for files you trust)")
    if window:
        p.add_argument("--temporal-window", type=positive_int, default=None,
                       help="tokens attended over online (models with attention)")


def _export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="zoo model name or package.module:function")
    p.add_argument("--onnx", required=True, help="output .onnx path (manifest: <path>.json)")
    p.add_argument("--frame-shape", type=_shape, required=True,
                   help="one input frame without batch, e.g. 3,160,160")
    p.add_argument("--batch-size", type=positive_int, default=1)
    _model_options(p)


def _export(args: argparse.Namespace) -> int:
    from .export import export_onnx

    check_writable(args.onnx, "--onnx")
    check_writable(f"{args.onnx}.json", "--onnx")
    net = load_model(args.model, trust=args.trust, temporal_window=args.temporal_window)
    probe_frames(net, args.frame_shape, args.model, args.batch_size)
    with frame_errors(args.frame_shape, args.model):
        manifest = export_onnx(net, args.onnx, args.frame_shape, batch_size=args.batch_size)
    print(f"wrote {args.onnx} (+ .json): {len(manifest['state'])} state tensors, "
          f"{manifest['frames_per_call']} frame(s) per call, delay {manifest['delay']}")
    return 0


_export.add_arguments = _export_args
command("export", "export a continual model's step to ONNX with a state manifest")(_export)


def _verify_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("onnx", help="an .onnx file written by `costream export`")
    p.add_argument("model", help="the model it was exported from (name or module:function)")
    p.add_argument("--frames", type=positive_int, default=None,
                   help="frames to stream (default: twice the receptive field)")
    p.add_argument("--atol", type=float, default=1e-4)
    _model_options(p)


def _verify(args: argparse.Namespace) -> int:
    import json
    import time

    import torch

    from .export import OnnxStreamRunner

    with user_errors():
        manifest = json.loads(Path(args.onnx + ".json").read_text())
    net = load_model(args.model, trust=args.trust, temporal_window=args.temporal_window)
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


def _bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("models", nargs="*",
                   help="models to run (default: the embedded set): built-in workloads tcn, "
                        "transformer; continual zoo models, e.g. cox3d_s; "
                        "package.module:function; files written by `costream convert`")
    p.add_argument("--batch-size", type=positive_int, default=1,
                   help="streams stepped together")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch threads (default: torch's)")
    p.add_argument("--device", type=device, default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--steps", type=positive_int, default=30,
                   help="steady-state steps timed per model")
    p.add_argument("--frame-shape", type=_shape, default=None,
                   help="input frame C,H,W (or C) for package.module:function models")
    p.add_argument("--json", default=None, metavar="PATH",
                   help="write the results as JSON to PATH (-: print JSON instead of the table)")
    p.add_argument("--csv", default=None, metavar="PATH",
                   help="write the results as CSV to PATH (-: print CSV instead of the table)")
    p.add_argument("--markdown", default=None, metavar="PATH",
                   help="write the results as a Markdown page (command, machine, table)")
    p.add_argument("--plot", default=None, metavar="PATH",
                   help="plot latency and speedup against window length, and MAC reduction vs "
                        "measured speedup (needs matplotlib)")
    p.add_argument("--windows", type=_shape, default=(1, 2, 4), metavar="F,F,...",
                   help="window lengths for --plot, as multiples of each clip (default 1,2,4)")
    p.add_argument("--seed", type=int, default=0, help="seed of random weights and inputs")
    p.add_argument("--backend", default="eager",
                   choices=("eager", "compiled", "onnxruntime", "openvino"),
                   help="what runs the timed steps (default eager; compiled falls back to "
                        "eager on a CPU, see compile_step)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _model_options(p)


def _bench(args: argparse.Namespace) -> int:
    import shlex
    import textwrap
    import time

    from .bench import format_table, plot_bench, run_bench, to_csv, to_json, to_markdown
    from .bench._report import NOTES, backend_note
    from .bench._run import WorkloadError
    from .bench._workloads import check_model_name

    for flag in ("json", "csv", "markdown", "plot"):
        check_writable(getattr(args, flag), f"--{flag}")
    if args.plot:
        import importlib.util

        if importlib.util.find_spec("matplotlib") is None:
            raise UsageError("--plot needs matplotlib: pip install matplotlib")
    with user_errors():
        for name in args.models:
            check_model_name(name, trust=args.trust)
    t0 = time.perf_counter()
    try:
        rows = run_bench(args.models or None, batch_size=args.batch_size, threads=args.threads,
                         device=args.device, steps=args.steps, progress=not args.no_progress,
                         frame_shape=args.frame_shape,
                         window_factors=args.windows if args.plot else (), seed=args.seed,
                         temporal_window=args.temporal_window, trust=args.trust,
                         backend=args.backend)
    except WorkloadError as err:
        raise UsageError(str(err)) from err
    elapsed = time.perf_counter() - t0
    command = " ".join(["costream", *(shlex.quote(a) for a in args.argv)])
    if args.json:
        text = to_json(rows, None if args.json == "-" else args.json, command=command)
        if args.json == "-":
            print(text, end="")
    if args.csv:
        text = to_csv(rows, None if args.csv == "-" else args.csv)
        if args.csv == "-":
            print(text, end="")
    if args.markdown:
        to_markdown(rows, args.markdown, command=command, seconds=elapsed)
    if args.plot:
        plot_bench(rows, args.plot)
    failed = [r["model"] for r in rows if not r["exact"]]
    if "-" not in (args.json, args.csv):
        threads = rows[0]["threads"] if rows else args.threads
        print(f"costream bench: {len(rows)} models, batch {args.batch_size}, threads {threads}, "
              f"{args.device}, random weights, float32{backend_note(rows)}")
        print(format_table(rows))
        print(textwrap.fill(NOTES.replace("`", ""), width=100))
        verdict = f"FAILED exactness: {', '.join(failed)}" if failed else "all exact"
        print(f"{verdict}; {elapsed:.0f} s in total.")
        if args.plot:
            print(f"plot: {args.plot}")
    return 1 if failed else 0


_bench.add_arguments = _bench_args
command("bench", "measure MACs, latency, state and exactness of continual models against "
                 "their offline run")(_bench)


def _convert_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="package.module:function returning a torch.nn model")
    p.add_argument("--out", required=True, help="output .pt (state_dict); spec: <out>.json")
    p.add_argument("--frame-shape", type=_shape, default=None,
                   help="one input frame without batch, e.g. 3,112,112 (1D models: C)")
    p.add_argument("--temporal-window", type=positive_int, default=None,
                   help="tokens attended over online (models with attention)")
    p.add_argument("--frames", type=positive_int, default=None,
                   help="frames of the verification clip (default: twice the receptive field)")
    p.add_argument("--rtol", type=float, default=None, help="default: float32 tolerance 1e-4")
    p.add_argument("--atol", type=float, default=None, help="default: float32 tolerance 1e-5")


def _convert(args: argparse.Namespace) -> int:
    import torch

    from ._version import __version__
    from .bench._converted import save_converted, window_reference
    from .bench._run import _exactness
    from .bench._workloads import _infer_frame_shape, build_source
    from .convert import continual
    from .testing import assert_streaming_equivalent, tolerances

    check_writable(args.out, "--out")
    check_writable(f"{args.out}.json", "--out")
    with user_errors():
        model = build_source(args.model).eval()
    options = {} if args.temporal_window is None else {"temporal_window": args.temporal_window}
    try:
        net = continual(model, **options).eval()
    except (TypeError, ValueError) as err:
        print(f"FAIL: cannot convert {args.model}: {one_line(err)}")
        return 1
    with user_errors():
        shape = args.frame_shape or _infer_frame_shape(net, args.model)
    geom = net.temporal
    frames = args.frames or 2 * geom.receptive_field + geom.stride
    clip = torch.randn(2, shape[0], frames, *shape[1:])
    tol = tolerances(torch.float32)
    rtol, atol = args.rtol or tol["rtol"], args.atol or tol["atol"]
    try:
        with frame_errors(shape, args.model):
            assert_streaming_equivalent(net, clip, window_reference(model, args.temporal_window),
                                        rtol=rtol, atol=atol)
    except AssertionError as err:
        print(f"FAIL: {args.model} does not stream exactly: {err}")
        return 1
    with torch.inference_mode():
        check = _exactness(net, clip)
    net.reset_state()
    out = Path(args.out)
    save_converted(net, out, {
        "source": args.model, "options": options,
        "frame_shape": list(shape), "receptive_field": geom.receptive_field,
        "delay": geom.delay, "stride": geom.stride, "padding": geom.padding,
        "params": sum(p.numel() for p in net.parameters()),
        "verified": {"frames": frames, "batch_size": 2, "rtol": rtol, "atol": atol,
                     "max_abs_diff": check["max_abs_diff"]},
        "costream": __version__, "torch": torch.__version__,
    })
    print(f"OK: {args.model} converted and verified on {frames} frames "
          f"(max |step - offline| = {check['max_abs_diff']:.2e}); receptive field "
          f"{geom.receptive_field}, delay {geom.delay}, stride {geom.stride}")
    print(f"wrote {out} (state_dict) and {out}.json (spec with checksums); load with "
          f"costream.bench.load_converted({str(out)!r}, build) or trust=True")
    return 0


_convert.add_arguments = _convert_args
command("convert", "convert a torch.nn model to a continual one, verify it streams exactly, "
                   "save it")(_convert)


def _info_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="built-in workload, zoo model, package.module:function or a "
                                 "file written by `costream convert`")
    p.add_argument("--frame-shape", type=_shape, default=None,
                   help="one input frame without batch (default: the model's native one)")
    p.add_argument("--batch-size", type=positive_int, default=1)
    p.add_argument("--json", action="store_true", help="print JSON")
    _model_options(p)


def _info(args: argparse.Namespace) -> int:
    import json

    from .bench._info import describe, format_info
    from .bench._workloads import resolve_workload

    with user_errors():
        w = resolve_workload(args.model, args.frame_shape, temporal_window=args.temporal_window,
                             trust=args.trust)
    probe_frames(w.net, w.frame_shape, args.model, args.batch_size)
    info = describe(w, args.batch_size)
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return 0


_info.add_arguments = _info_args
command("info", "receptive field, delay, stride and state shapes of a continual model")(_info)


def _prune(args: argparse.Namespace) -> int:
    from .prune._cli import run

    return run(args)


def _prune_args(p: argparse.ArgumentParser) -> None:
    from .prune._cli import add_arguments

    add_arguments(p)


_prune.add_arguments = _prune_args
command("prune", "prune a model's channels (MODULE:FUNCTION) and save it")(_prune)


def _prune_llm(args: argparse.Namespace) -> int:
    from .prune.hf._cli import run

    return run(args)


def _prune_llm_args(p: argparse.ArgumentParser) -> None:
    from .prune.hf._cli import add_arguments

    add_arguments(p)


_prune_llm.add_arguments = _prune_llm_args
command("prune-llm", "prune a saved decoder LLM's heads and neurons into a new model directory")(
    _prune_llm)


def _listen(args: argparse.Namespace) -> int:
    from .audio._listen import run

    return run(args)


def _listen_args(p: argparse.ArgumentParser) -> None:
    from .audio._listen import add_arguments

    add_arguments(p)


_listen.add_arguments = _listen_args
command("listen", "stream a WAV file through a keyword spotter, printing detections live")(
    _listen)


def _serve(args: argparse.Namespace) -> int:
    from .serve._cli import run

    return run(args)


def _serve_args(p: argparse.ArgumentParser) -> None:
    from .serve._cli import add_arguments

    add_arguments(p)


_serve.add_arguments = _serve_args
command("serve", "serve a model's streams on Ray Serve (replicas, failover, HTTP/WebSocket); "
        "--bench drives it with a load generator")(_serve)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``costream`` console script; returns the exit status."""
    parser = ArgumentParser(prog="costream", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an error instead of one line")
    sub = parser.add_subparsers(dest="command", required=True)
    runners = {}
    for name, add_arguments, run in _COMMANDS:
        p = sub.add_parser(name, help=getattr(run, "help_text", None))
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show the traceback of an error instead of one line")
        add_arguments(p)
        runners[name] = run
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    args = None
    try:
        args = parser.parse_args(argv)
        args.argv = argv
        return runners[args.command](args)
    except UsageError as err:
        if debug:
            raise
        prog = err.prog or (f"costream {args.command}" if args else "costream")
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("costream: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if debug or args is None:
            raise
        print(f"costream {args.command}: error: {type(err).__name__}: {one_line(err)} "
              f"(--debug shows the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
