"""Per-request scratch state shared by the plugins of one scheduling cycle (llm-d's
CycleState): a scorer writes what it learned (prefix matches), later plugins read it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from epp.types import Endpoint

T = TypeVar("T")


@dataclass(slots=True)
class PrefixMatchInfo:
    """What a prefix scorer found for this request. `matched_tokens[key]` is the length of
    the cached prefix on that endpoint (0 when absent); `prompt_tokens` the prompt length in
    tokens (estimated from characters when the request is not tokenized)."""

    prompt_tokens: int
    block_size_tokens: int
    matched_tokens: dict[str, int] = field(default_factory=dict)
    source: str = ""  # plugin type that wrote it

    def hit_tokens(self, endpoint_key: str) -> int:
        return self.matched_tokens.get(endpoint_key, 0)

    def uncached_tokens(self, endpoint_key: str) -> int:
        return max(0, self.prompt_tokens - self.hit_tokens(endpoint_key))

    def any_hit(self) -> bool:
        return any(v > 0 for v in self.matched_tokens.values())


# Well-known keys.
PREFIX_MATCH_KEY = "prefix-match"


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

    def prefix_match(self) -> PrefixMatchInfo | None:
        return self.read(PREFIX_MATCH_KEY, PrefixMatchInfo)
