"""Fixtures for the simulator tests."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from simzmq import Subscriber


@pytest.fixture
def subscribers() -> Iterator[Callable[..., Subscriber]]:
    made: list[Subscriber] = []

    def make(endpoint: str, *, bind: bool = False) -> Subscriber:
        sub = Subscriber(endpoint, bind=bind)
        made.append(sub)
        return sub

    yield make
    for sub in made:
        sub.close()
