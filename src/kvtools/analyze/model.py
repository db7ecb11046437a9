"""The simulation's input: one trace, already in content keys."""

from __future__ import annotations

from dataclasses import dataclass, field

from kvindex.keys import ContentKey

__all__ = ["Trace", "TraceRequest"]


@dataclass(frozen=True, slots=True)
class TraceRequest:
    arrival_ms: float  # from the start of the trace
    input_tokens: int
    output_tokens: int
    keys: tuple[ContentKey, ...]  # content keys of the prompt's full blocks, in order
    # What the keys were chained over (``chain_keys(root_key(model, lora), tokens,
    # trace.chain_block)``): what a simulated engine puts in its BlockStored events.
    tokens: tuple[int, ...] = ()
    model: str = ""
    lora: str | None = None


@dataclass(slots=True)
class Trace:
    source: str  # file path or shipped trace name
    format: str  # "mooncake" | "requests"
    block_tokens: int  # tokens per block (one key), for the cost model
    chain_block: int = 1  # entries of TraceRequest.tokens per key (Mooncake: 1 id per block)
    requests: list[TraceRequest] = field(default_factory=list)
    bad_lines: int = 0  # skipped with --skip-bad-lines

    @property
    def blocks(self) -> int:
        return sum(len(r.keys) for r in self.requests)

    @property
    def span_s(self) -> float:
        if not self.requests:
            return 0.0
        return (self.requests[-1].arrival_ms - self.requests[0].arrival_ms) / 1000.0
