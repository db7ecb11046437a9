"""The shape both console scripts (`kvindex`, `epp`) share: one parser whose subcommands are
registered by their own modules (`register(subparsers)` sets `func`: args -> exit code)."""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Sequence


def build_parser(prog: str, description: str, modules: Sequence[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in modules:
        importlib.import_module(name).register(subparsers)
    return parser


def run(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> int:
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130
