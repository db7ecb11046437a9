"""The `kvindex` command: one entry point; each subcommand lives in `kvindex.commands.<name>`
and exposes `register(subparsers)`, which adds its parser and sets `func` (args -> exit code)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from kvindex.commands import _cli

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
    return _cli.build_parser(
        "kvindex", "Precise KV-cache block index for LLM serving clusters.", COMMAND_MODULES
    )


def main(argv: Sequence[str] | None = None) -> int:
    return _cli.run(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
