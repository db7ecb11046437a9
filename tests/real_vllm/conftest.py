"""Two real vLLM engines (CPU build, tiny model, random weights) shared by the real-engine
tests: `vllm-0` with 32-token blocks and `vllm-1` with 64-token blocks, both with a KV cache
small enough (8,192 tokens) that a few prompts evict. Started one after the other, once per
session; each test starts its own index (or picker) against them.

The engines publish as in llm-d's precise-prefix-cache guide (central mode): each connects its
PUB socket to the events address the index (or the picker) binds, `EVENTS_PORT` here, so one
index after another can bind it; each engine's replay ROUTER binds a port of its own."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from kvtools.real_vllm.engines import (
    VLLMEngine,
    VLLMEnvironmentMissing,
    central_specs,
    find_vllm_python,
    start_engines,
)
from kvtools.real_vllm.model import write_real_model_dir
from tests.ports import free_port

MODEL = "tiny"
# pytest-timeout's limit (pyproject: 120 s) covers fixture setup too, and the first test
# pays for starting both engines (2-4 minutes on 2 busy cores).
REAL_ENGINE_TEST_TIMEOUT_S = 900


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in item.path.parents and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(REAL_ENGINE_TEST_TIMEOUT_S))


@pytest.fixture(scope="session")
def vllm_python() -> Path:
    try:
        return find_vllm_python(Path(__file__))
    except VLLMEnvironmentMissing as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_real_model_dir(tmp_path_factory.mktemp("real-model"))


@pytest.fixture(scope="session")
def engines(
    tmp_path_factory: pytest.TempPathFactory, vllm_python: Path, model_dir: Path
) -> Iterator[list[VLLMEngine]]:
    workdir = tmp_path_factory.mktemp("vllm-engines")
    _, specs = central_specs(
        2, model=MODEL, model_dir=model_dir, port=free_port, block_sizes=(32, 64)
    )
    started = start_engines(specs, workdir, python=vllm_python)
    yield started
    for engine in started:
        engine.stop()
