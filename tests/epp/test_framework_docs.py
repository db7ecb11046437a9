"""Every YAML example in docs/epp-config.md loads and builds (keeps the docs true)."""

from __future__ import annotations

import pathlib
import re
from collections.abc import Mapping, Sequence

import pytest

from epp.framework import SchedulerDeps, build_scheduler, load_config
from epp.plugins import default_registry
from epp.plugins.precise_prefix import PREFIX_BACKEND_FACTORY, PrecisePrefixParams
from epp.types import LLMRequest

DOC = pathlib.Path(__file__).resolve().parents[2] / "docs" / "epp-config.md"
BLOCKS = re.findall(r"```yaml\n(.*?)```", DOC.read_text(), flags=re.S)


class NullBackend:
    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def score(self, request: LLMRequest, candidates: Sequence[str]) -> Mapping[str, float]:
        return {}

    def record_pick(self, request: LLMRequest, endpoint_key: str) -> None: ...


def test_the_doc_has_examples() -> None:
    assert len(BLOCKS) >= 5


@pytest.mark.parametrize("text", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_doc_example_loads_and_builds(text: str) -> None:
    config = load_config(text, default_registry())

    def factory(params: PrecisePrefixParams) -> NullBackend:
        return NullBackend()

    build_scheduler(config, SchedulerDeps(extras={PREFIX_BACKEND_FACTORY: factory}))
