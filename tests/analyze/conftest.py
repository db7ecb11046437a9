from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from kvtools.cli import main


@pytest.fixture
def run_analyze(tmp_path: Path) -> Callable[..., dict[str, Any]]:
    """Run ``kvindex analyze ARGS --json FILE`` in-process; returns the JSON document."""

    def run(*args: str) -> dict[str, Any]:
        out = tmp_path / "report.json"
        code = main(["analyze", *args, "--json", str(out), "--quiet"])
        assert code == 0
        document: dict[str, Any] = json.loads(out.read_text())
        return document

    return run
