"""The ``epserve`` command."""
from __future__ import annotations

import argparse
import sys

from epserve.services.generate_cmd import add_generate_parser
from epserve.services.serve_cmd import add_serve_parser
from epserve.services.up_cmd import add_up_parser


class UsageError(Exception):
    """A bad argument: printed as ``epserve COMMAND: error: MESSAGE``, exit status 2, no traceback."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="epserve", description="Expert-parallel inference for DeepSeek-V3-architecture models")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_generate_parser(commands)
    add_up_parser(commands)
    add_serve_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except UsageError as err:
        print(f"epserve {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
