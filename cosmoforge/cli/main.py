"""`cosmo`: the command line. Each command lives in the module that owns its work.

A command module exposes `register(subparsers)`, which adds its parser and sets `func` to a
callable taking the parsed arguments and returning an exit code. Registration must stay cheap:
heavy imports (torch, datatrove, llama.cpp) belong inside the command's function.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Modules that register commands, in the order `cosmo --help` lists them.
COMMAND_MODULES = [
    "cosmoforge.cli.run",
    "cosmoforge.cli.plan",
    "cosmoforge.cli.report",
    "cosmoforge.cli.train",
    "cosmoforge.cli.cluster",
    "cosmoforge.cli.operator",
    "cosmoforge.cli.dispatch",
    "cosmoforge.cli.compact",
    "cosmoforge.cli.postprocess",
    "cosmoforge.cli.publish",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cosmo",
        description="cosmoforge: synthetic pre-training data after the Cosmopedia recipe.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
