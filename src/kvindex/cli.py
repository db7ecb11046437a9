"""The `kvindex` command's library commands: each lives in `kvindex.commands.<name>` and exposes
`register(subparsers)`, which adds its parser and sets `func` (args -> exit code).

The installed `kvindex` script is put together by `kvtools.cli`, which adds the tools' commands
(`demo`, `analyze`) beside these; kvindex itself never imports the tools package."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from kvindex.commands import _cli

# One line per subcommand module; each module owns its flags and its handler.
COMMAND_MODULES: tuple[str, ...] = (
    "kvindex.commands.doctor",
    "kvindex.commands.hash",
    "kvindex.commands.inspect",
    "kvindex.commands.record",
    "kvindex.commands.serve",
)


def build_parser(extra_modules: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The parser of the library's commands plus ``extra_modules`` (each with ``register``)."""
    return _cli.build_parser(
        "kvindex",
        "Precise KV-cache block index for LLM serving clusters.",
        (*COMMAND_MODULES, *extra_modules),
    )


def main(argv: Sequence[str] | None = None, extra_modules: Sequence[str] = ()) -> int:
    return _cli.run(build_parser(extra_modules), argv)


if __name__ == "__main__":
    sys.exit(main())
