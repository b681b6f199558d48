"""`python -m zimage.server ...`: the `serve` subcommand on its own (same flags as `zimage serve`)."""

import argparse
import sys

from zimage.cli import serve
from zimage.errors import ZImageError


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m zimage.server")
    sub = parser.add_subparsers(dest="command")
    serve.register(sub)
    args = parser.parse_args(["serve", *(sys.argv[1:] if argv is None else argv)])
    try:
        return args.func(args)
    except ZImageError as e:
        print(f"zimage serve: error: {e}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
