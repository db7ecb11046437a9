"""Fixtures shared by the kvindex tests. `index_factory` is parametrised over every index
backend, so one behaviour suite runs against all of them."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from kvindex.index import BlockIndex, MemoryIndex

IndexFactory = Callable[[], BlockIndex]


def _memory() -> Iterator[IndexFactory]:
    yield MemoryIndex


# Each backend registers a generator yielding a factory; it cleans up after the test.
BACKENDS: dict[str, Callable[[], Iterator[IndexFactory]]] = {"memory": _memory}


@pytest.fixture(params=sorted(BACKENDS))
def index_factory(request: pytest.FixtureRequest) -> Iterator[IndexFactory]:
    yield from BACKENDS[request.param]()
