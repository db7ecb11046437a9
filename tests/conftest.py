"""Suite-wide options. The real-engine tests (tests/real_vllm) start real vLLM engines from
their own environment (`make vllm-env`) and take minutes, so they run as a stage of their own
(`make test-real-vllm`, `.ci/run`) and only when asked for with --real-vllm."""

from __future__ import annotations

from pathlib import Path

import pytest

_REAL_VLLM_DIR = Path(__file__).parent / "real_vllm"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--real-vllm",
        action="store_true",
        help="run tests/real_vllm against real vLLM engines (make vllm-env installs them)",
    )


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    if collection_path == _REAL_VLLM_DIR and not config.getoption("--real-vllm"):
        return True
    return None
