"""Per-request scratch state shared by the plugins of one scheduling cycle (llm-d's
CycleState): a scorer writes what it learned (prefix matches), later plugins read it.

The framework defines no keys: a plugin family that shares data declares its key and value
type with its plugins (e.g. `epp.plugins.shared.PREFIX_MATCH_KEY`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from epp.types import Endpoint

T = TypeVar("T")


class CycleState:
    """A typed scratch dictionary for one `schedule` call."""

    __slots__ = ("_data", "now")

    def __init__(self, now: float = 0.0) -> None:
        self._data: dict[str, Any] = {}
        self.now = now  # the scheduler clock at the start of the cycle

    @staticmethod
    def key(endpoint: Endpoint) -> str:
        return endpoint.key

    @staticmethod
    def keys(endpoints: list[Endpoint]) -> list[str]:
        return [e.key for e in endpoints]

    def write(self, key: str, value: object) -> None:
        self._data[key] = value

    def read(self, key: str, kind: type[T]) -> T | None:
        value = self._data.get(key)
        return value if isinstance(value, kind) else None
