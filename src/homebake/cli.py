"""The `homebake` command line: a thin dispatcher over homebake.commands.*.

Each command module exposes ``register(subparsers)``, which adds its parser and sets
``func`` to a callable taking the parsed namespace and returning an exit code.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from . import __version__
from .errors import HomebakeError

# One module per command (or command group); order is the order shown in --help.
COMMAND_MODULES = [
    "homebake.commands.setup",
    "homebake.commands.demo",
    "homebake.commands.generate",
    "homebake.commands.data",
    "homebake.commands.train",
    "homebake.commands.plan",
    "homebake.commands.evaluate",
    "homebake.commands.export",
    "homebake.commands.merge",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="homebake",
        description="Fine-tune an open-weight LLM on your own data, on your own machine.",
    )
    parser.add_argument("--version", action="version", version=f"homebake {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv  # the command line itself, for a command that starts itself again (train --nproc-per-node)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except HomebakeError as error:
        if args.debug:
            raise
        if not getattr(error, "silent", False):  # several ranks: an error they all share, said once by rank 0
            print(f"homebake: error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("homebake: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
