"""The `kvindex` command: one entry point; each subcommand lives in `kvindex.commands.<name>`
and exposes `register(subparsers)`, which adds its parser and sets `func` (args -> exit code)."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# One line per subcommand module; each module owns its flags and its handler.
COMMAND_MODULES: tuple[str, ...] = (
    "kvindex.commands.analyze",
    "kvindex.commands.demo",
    "kvindex.commands.doctor",
    "kvindex.commands.hash",
    "kvindex.commands.inspect",
    "kvindex.commands.record",
    "kvindex.commands.serve",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvindex", description="Precise KV-cache block index for LLM serving clusters."
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
