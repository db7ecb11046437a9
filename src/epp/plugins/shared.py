"""What plugin families share through the `CycleState`: each shared value's key and type,
declared here with the plugins that write and read them (the framework knows none of them).

The prefix scorers (approximate and precise) write a `PrefixMatchInfo`; the P/D decider,
the in-flight load scorer and the latency predictor read it with `prefix_match(cycle)`."""

from __future__ import annotations

from dataclasses import dataclass, field

from epp.framework.cycle import CycleState


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


PREFIX_MATCH_KEY = "prefix-match"


def prefix_match(cycle: CycleState) -> PrefixMatchInfo | None:
    """This cycle's `PrefixMatchInfo`, or None when no prefix scorer ran (yet)."""
    return cycle.read(PREFIX_MATCH_KEY, PrefixMatchInfo)
