"""Runs `epp serve` with the test scheduler double (the real framework is a teammate's
package): `python tests/epp/run_picker.py <epp serve flags>`. Used by test_server.py to
exercise the real process, signal handling and drain."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from extproc_client import LeastWaitingScheduler

from epp.cli import build_parser
from epp.commands import serve

if __name__ == "__main__":
    args = build_parser().parse_args(["serve", *sys.argv[1:]])
    sys.exit(serve.run(args, factory=lambda path, deps: LeastWaitingScheduler()))
