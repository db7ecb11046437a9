"""`kvindex doctor`: why does (or doesn't) a prompt hit the cache? Pure, no I/O.

For one prompt of one model the report shows its block keys, which engines hold each block
(and in which tier), where each engine's prefix match stops, what events each engine has sent,
and warnings for the misconfigurations users hit most (see :data:`SKIP_WARNINGS` and
:func:`diagnose`). The service gathers the inputs (event statistics from the subscriber,
engine token ids from the engine's ``/tokenize``) and serves the report on ``/v1/debug``; the
CLI renders it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec

from kvindex.index.base import BlockIndex, Tier
from kvindex.scoring import ScoreResult

__all__ = [
    "SKIP_WARNINGS",
    "BlockHolders",
    "DoctorReport",
    "DoctorWarning",
    "EngineEventStats",
    "EngineMatch",
    "EventStatsProvider",
    "TokenCheck",
    "compare_tokens",
    "diagnose",
    "has_port",
]


@dataclass(frozen=True, slots=True)
class EngineEventStats:
    """What the subscriber knows of one engine (the service adapts its own state to this)."""

    engine: str  # endpoint key, "ip:port"
    model: str | None = None
    discovered: bool = True  # known from discovery (static list, file, Kubernetes)
    batches: int = 0
    events: dict[str, int] = field(default_factory=dict)  # by event type
    skipped: dict[str, int] = field(default_factory=dict)  # skipped blocks by reason
    last_seq: int | None = None
    last_batch_time: float | None = None  # unix seconds
    # kvindex.sync.EngineSync.to_builtins: state, reason, for_s, silent_s, lost_batches
    sync: dict[str, Any] | None = None
    # The engine's KV block size from its events (kvindex.engine_blocks); indexable False when
    # the index's block size cannot divide it (its blocks are skipped).
    block_size: int | None = None
    block_size_indexable: bool = True


EventStatsProvider = Callable[[], Sequence[EngineEventStats]]


@dataclass(frozen=True, slots=True)
class BlockHolders:
    index: int
    key: str  # content key, 16 hex digits
    holders: dict[str, str]  # engine -> best tier ("gpu", "cpu", "storage")


@dataclass(frozen=True, slots=True)
class EngineMatch:
    engine: str
    matched_blocks: int
    score: float
    stops_at: int | None  # first block not held, None when the whole prompt matches
    holds_later: int  # blocks held after the stop (the prefix broke: eviction or a gap)


@dataclass(frozen=True, slots=True)
class TokenCheck:
    engine_url: str
    ok: bool
    our_tokens: int
    engine_tokens: int | None = None
    first_difference: int | None = None  # token position, when the ids differ
    error: str | None = None


@dataclass(frozen=True, slots=True)
class DoctorWarning:
    code: str
    message: str
    fix: str
    engine: str | None = None


@dataclass(frozen=True, slots=True)
class DoctorReport:
    model: str
    lora: str | None
    cache_salt: str | None
    block_size: int
    prompt_tokens: int
    total_blocks: int
    blocks: list[BlockHolders]
    engines: list[EngineMatch]
    events: list[EngineEventStats]
    warnings: list[DoctorWarning]
    token_checks: list[TokenCheck]

    def to_builtins(self) -> dict[str, Any]:
        out: dict[str, Any] = msgspec.to_builtins(self)
        return out


_PORT = re.compile(r"(?:^\[[^\]]*\]|^[^:\[\]]+):\d{1,5}$")


def has_port(engine: str) -> bool:
    """Whether an engine key is ``host:port`` (``[v6]:port``), as the picker keys endpoints."""
    return bool(_PORT.match(engine))


# Skip reasons (from ingest counts) that mean a misconfiguration: code, message, fix.
SKIP_WARNINGS: dict[str, tuple[str, str, str]] = {
    "block_size_not_multiple": (
        "block_size_mismatch",
        "{n} blocks skipped: the engine's block size is not a multiple of ours ({bs})",
        "run the engine with --block-size a multiple of {bs}, or run kvindex with "
        "--block-size dividing the engine's",
    ),
    "unknown_parent_dropped": (
        "events_lost",
        "{n} blocks dropped: their parent block was never seen (events lost, no replay)",
        "set replay_endpoint in the engine's --kv-events-config so gaps are replayed",
    ),
    "token_id_out_of_range": (
        "bad_token_ids",
        "{n} blocks skipped: token ids outside [0, 2**32)",
        "check the engine version; this is not a vLLM event stream as we know it",
    ),
    "unknown_medium": (
        "unknown_medium",
        "{n} blocks skipped: unknown medium (cache tier)",
        "upgrade kvindex or report the medium name",
    ),
}

_TIER_NAMES = {Tier.GPU: "gpu", Tier.CPU: "cpu", Tier.STORAGE: "storage"}


def compare_tokens(
    engine_url: str, ours: Sequence[int], engine: Sequence[int] | None, error: str | None
) -> TokenCheck:
    if engine is None:
        return TokenCheck(engine_url, False, len(ours), error=error or "no answer")
    first = next((i for i, (a, b) in enumerate(zip(ours, engine, strict=False)) if a != b), None)
    if first is None and len(ours) != len(engine):
        first = min(len(ours), len(engine))
    return TokenCheck(engine_url, first is None, len(ours), len(engine), first)


def _block_holders(index: BlockIndex, keys: Sequence[int]) -> list[BlockHolders]:
    out = []
    for i, key in enumerate(keys):
        holders = {}
        for engine, match in sorted(index.lookup([key]).items()):
            tier = next(t for t in Tier if match.by_tier[t])
            holders[engine] = _TIER_NAMES[tier]
        out.append(BlockHolders(i, f"{key:016x}", holders))
    return out


def diagnose(
    index: BlockIndex,
    result: ScoreResult,
    events: Sequence[EngineEventStats] = (),
    token_checks: Sequence[TokenCheck] = (),
    cache_salt: str | None = None,
) -> DoctorReport:
    """The report for one scored prompt (``result`` from ``Scorer.score_tokens``, which
    carries the prompt's keys)."""
    keys = result.keys
    total = result.total_blocks
    blocks = _block_holders(index, keys)
    held_by: dict[str, set[int]] = {}
    for block in blocks:
        for engine in block.holders:
            held_by.setdefault(engine, set()).add(block.index)
    engines = []
    scores = {s.engine: s for s in result.scores}
    for engine in sorted(set(scores) | set(held_by)):
        score = scores.get(engine)
        held = held_by.get(engine, set())
        # Where the engine's run of held blocks breaks; its score may count fewer blocks
        # (whole engine blocks only, never the block of the prompt's last token).
        run = 0
        while run in held:
            run += 1
        engines.append(
            EngineMatch(
                engine=engine,
                matched_blocks=score.matched_blocks if score else 0,
                score=score.score if score else 0.0,
                stops_at=None if run >= total else run,
                holds_later=sum(1 for i in held if i > run),
            )
        )
    engines.sort(key=lambda m: (-m.score, -m.matched_blocks, m.engine))
    warnings = _warnings(index, result, blocks, events, token_checks)
    return DoctorReport(
        model=result.model,
        lora=result.lora,
        cache_salt=cache_salt,
        block_size=result.block_size,
        prompt_tokens=result.prompt_tokens,
        total_blocks=total,
        blocks=blocks,
        engines=engines,
        events=sorted(events, key=lambda e: e.engine),
        warnings=warnings,
        token_checks=list(token_checks),
    )


def _warnings(
    index: BlockIndex,
    result: ScoreResult,
    blocks: Sequence[BlockHolders],
    events: Sequence[EngineEventStats],
    token_checks: Sequence[TokenCheck],
) -> list[DoctorWarning]:
    out: list[DoctorWarning] = []
    names = sorted({*index.engines(), *(e.engine for e in events)})
    for engine in names:
        if not has_port(engine):
            out.append(
                DoctorWarning(
                    "engine_without_port",
                    f"engine key {engine!r} has no port, so it never matches the picker's "
                    "ip:port endpoints (scores silently 0)",
                    "publish the topic as kv@<pod-ip>:<serving-port>@<model>",
                    engine,
                )
            )
    for stats in sorted(events, key=lambda e: e.engine):
        sync = stats.sync or {}
        state = sync.get("state")
        if state in ("unsynced", "replaying") and sync.get("reason") != "no_events":
            out.append(
                DoctorWarning(
                    "engine_not_synced",
                    f"engine {stats.engine} is {state} ({sync.get('reason')}) for "
                    f"{sync.get('for_s')}s: its entries are withheld from scores",
                    "silent or dead: check the engine and that kvindex reaches its event and "
                    "replay sockets; replaying: wait for the replay (kvindex_ingest_replays)",
                    stats.engine,
                )
            )
        elif state == "degraded":
            out.append(
                DoctorWarning(
                    "engine_degraded",
                    f"engine {stats.engine} lost {sync.get('lost_batches')} batches for good "
                    f"({sync.get('reason')}): it was rebuilt from its replay buffer and live "
                    "events, so the index may miss blocks it still caches (never claims "
                    f"evicted ones); reported for {sync.get('degraded_for_s')}s more",
                    "configure the engine's replay endpoint (--replay-endpoint) and a larger "
                    "vLLM replay buffer; raise vLLM's PUB hwm if gaps come under load",
                    stats.engine,
                )
            )
        if stats.discovered and stats.batches == 0:
            out.append(
                DoctorWarning(
                    "no_events",
                    f"engine {stats.engine} is known from discovery but has sent no KV events",
                    'start vLLM with --kv-events-config \'{"enable_kv_cache_events": true, '
                    '"publisher": "zmq", "endpoint": "tcp://*:5557", "topic": "kv@<ip>:<port>@'
                    "<model>\"}' and check kvindex connects to that endpoint",
                    stats.engine,
                )
            )
        for reason, n in sorted(stats.skipped.items()):
            rule = SKIP_WARNINGS.get(reason)
            if rule is None or n <= 0:
                continue
            code, message, fix = rule
            out.append(
                DoctorWarning(
                    code,
                    message.format(n=n, bs=result.block_size),
                    fix.format(bs=result.block_size),
                    stats.engine,
                )
            )
    for check in token_checks:
        if check.error is not None:
            out.append(
                DoctorWarning(
                    "engine_tokenize_failed",
                    f"could not get token ids from {check.engine_url}: {check.error}",
                    "pass the engine's base URL (http://ip:port) serving POST /tokenize",
                )
            )
        elif not check.ok:
            out.append(
                DoctorWarning(
                    "token_mismatch",
                    f"our tokenizer and the engine at {check.engine_url} disagree from token "
                    f"{check.first_difference} on ({check.our_tokens} vs "
                    f"{check.engine_tokens} tokens): no prefix can match past that block",
                    "configure --tokenizer MODEL=PATH with the engine's exact tokenizer files "
                    "(same revision and chat template)",
                )
            )
    if result.total_blocks and names and blocks and not blocks[0].holders:
        out.append(
            DoctorWarning(
                "no_engine_holds_first_block",
                "no engine holds the prompt's first block (a cold prompt, or a different "
                "model, LoRA adapter, cache salt or tokenization than the engines saw)",
                "check the model name, lora and cache_salt match what the engine was sent",
            )
        )
    return out
