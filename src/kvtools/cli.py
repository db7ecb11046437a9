"""The installed `kvindex` script: the library's commands (`kvindex.cli`) plus the tools'
(`demo`, `analyze`), which live here because they import both kvindex and epp."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from kvindex import cli as kvindex_cli

TOOL_COMMAND_MODULES: tuple[str, ...] = (
    "kvtools.commands.analyze",
    "kvtools.commands.demo",
)


def build_parser() -> argparse.ArgumentParser:
    return kvindex_cli.build_parser(TOOL_COMMAND_MODULES)


def main(argv: Sequence[str] | None = None) -> int:
    return kvindex_cli.main(argv, TOOL_COMMAND_MODULES)


if __name__ == "__main__":
    sys.exit(main())
