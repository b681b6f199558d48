"""`zimage` entry point: parse, dispatch, and turn zimage errors into a message and an exit code (no traceback).

Exit codes: 0 ok, 1 runtime error (model missing, device absent, ...), 2 usage error (bad value), 130 interrupted.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import NoReturn

from zimage.errors import ZImageError
from zimage.version import __version__

SUBCOMMANDS = ("generate", "info", "plan", "show", "lora", "download", "make_tiny", "serve")


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = argparse.ArgumentParser(
        prog="zimage",
        description="Fast, memory-smart text-to-image with Z-Image-Turbo. Run `zimage COMMAND --help` for details.",
    )
    parser.add_argument("--version", action="version", version=f"zimage {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log more: each loading phase with its time, plans, libraries' notes")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in SUBCOMMANDS:
        importlib.import_module(f"zimage.cli.{name}").register(sub)  # adds "make-tiny" etc.
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse `argv` (default: the command line) and run the command; returns its exit code."""
    return run(build_parser().parse_args(argv))


def run(args) -> int:
    # Our own notes (loading summary, plans) at INFO; libraries stay at WARNING unless -v. With -v, zimage's
    # timeline of each phase (DEBUG), stamped with milliseconds since the process imported logging (~its start).
    fmt = "%(relativeCreated)7.0f ms %(levelname)s: %(message)s" if args.verbose else "%(levelname)s: %(message)s"
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format=fmt)
    logging.getLogger("zimage").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    try:
        return args.func(args)
    except ZImageError as e:
        print(f"zimage: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("zimage: interrupted", file=sys.stderr)
        return 130


FAST_EXIT = ("generate",)  # commands that end with a loaded model and nothing left to run


def entry(argv: list[str] | None = None) -> NoReturn:
    """The `zimage` console script and `python -m zimage`.

    After `generate`, an exit that skips the interpreter's teardown: after a model was loaded that teardown frees
    ~21 GB of GPU memory block by block, the pinned host buffers and torch's modules: 0.8-1.2 s of waiting after the
    PNG is saved, 0.3 s without (H200, BENCHMARKS.md); the OS reclaims it all at once. Every file generate writes is
    closed before it returns; streams are flushed here. Every other command (the server above all, whose shutdown
    may rely on atexit handlers, finalizers and non-daemon threads) exits normally, through sys.exit."""
    args = build_parser().parse_args(argv)
    code = run(args)
    if args.command not in FAST_EXIT:
        sys.exit(code)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
