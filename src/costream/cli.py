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
