"""The ``epserve`` command."""
from __future__ import annotations

import argparse
import sys

from epserve.services.generate_cmd import add_generate_parser
from epserve.services.placement_cmd import add_placement_parser
from epserve.services.serve_cmd import add_serve_parser
from epserve.services.up_cmd import add_up_parser
from epserve.services.usage import UsageError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="epserve", description="Expert-parallel inference for DeepSeek-V3-architecture models")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_generate_parser(commands)
    add_up_parser(commands)
    add_serve_parser(commands)
    add_placement_parser(commands)
    add_loadtest_parser(commands)
    return parser


def add_loadtest_parser(commands) -> None:
    p = commands.add_parser("loadtest", help="the load-test harness (as python -m epserve.load_tests)",
                            add_help=False, prefix_chars="\0")
    p.add_argument("argv", nargs=argparse.REMAINDER, help="run | report | sharegpt, and their flags (--help)")
    p.set_defaults(handler=_loadtest)


def _loadtest(args: argparse.Namespace) -> int:
    from epserve.load_tests.cli import main as loadtest_main   # numpy and the harness only when asked for

    return loadtest_main(args.argv, prog="epserve loadtest")


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
