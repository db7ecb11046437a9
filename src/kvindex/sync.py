"""Per-engine sync state: can the index's entries of an engine be trusted? Pure: no sockets,
no clock reads (every call takes ``now``, monotonic seconds, from the caller).

States (docs/ingest.md, "Sync state"):

* ``unsynced``: what the index holds for the engine may be wrong or is missing (seen for the
  first time, silent for ``stale_after_s``, dead, its index writes refused). Withheld.
* ``replaying``: a replay that decides what the index holds is running (first contact, a
  gap, a restart, a sequence conflict, an index recovery). Withheld: before it ends the index
  may still claim blocks the engine evicted in the gap.
* ``synced``: the index holds what the engine's stream says, from its start (seq 0) or from
  a verified replay on. Scored.
* ``degraded``: an unrepairable loss (the replay buffer no longer covered a gap, a replay
  failed, no replay endpoint): the engine was cleared and rebuilt from what the buffer held
  plus the live stream, so the index holds a *subset* of what the engine caches (misses,
  never false hits). Scored, and reported until ``degraded_for_s`` after the last loss, or
  until a restart or a complete replay makes the index whole again.

Each ingest decision is one call here; the ingest service (the only writer) asks
:meth:`SyncTable.tick` for silent and dead engines. Readers (the scorer, on other threads)
read :attr:`SyncTable.factors`, a snapshot replaced (never mutated) on every change.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum

__all__ = [
    "SCORED_STATES",
    "EngineSync",
    "SyncConfig",
    "SyncReason",
    "SyncState",
    "SyncTable",
    "SyncTick",
]


class SyncState(StrEnum):
    UNSYNCED = "unsynced"
    REPLAYING = "replaying"
    SYNCED = "synced"
    DEGRADED = "degraded"


# Entries of engines in these states are scored as they are (degraded: a subset of the truth).
SCORED_STATES = frozenset({SyncState.SYNCED, SyncState.DEGRADED})


class SyncReason(StrEnum):
    """Why an engine is in its state (a bounded set: logged, shown in /readyz and the doctor)."""

    NO_EVENTS = "no_events"  # known (discovery) but nothing received yet
    STREAM_START = "stream_start"  # first batch seen was seq 0: the whole stream is here
    FIRST_CONTACT = "first_contact"  # first batch seq > 0: replaying from 0
    GAP = "gap"  # batches missing: replaying them
    RESTART = "restart"  # the engine restarted (its entries were cleared)
    SEQ_CONFLICT = "seq_conflict"  # two batches with one seq: cleared, replaying
    INDEX_UNAVAILABLE = "index_unavailable"  # the index refused writes
    REPLAYED = "replayed"  # a replay completed
    LOST = "lost"  # an unrepairable loss (cleared and rebuilt)
    LOSS_AGED = "loss_aged"  # degraded_for_s passed since the last loss
    SILENT = "silent"  # no batch for stale_after_s (and no probe answered)
    RESUMED = "resumed"  # a batch (or a probe answer) after silence
    DEAD = "dead"  # silent for drop_after_s: its entries were dropped
    TAKEOVER = "takeover"  # this replica took over the engine's stream: replaying from
    # where the index stands (docs/redis.md, "Writer model")
    OTHER_WRITER = "other_writer"  # another replica writes it: its published state
    NO_WRITER = "no_writer"  # no replica holds the engine's writer lease (takeover pending)


@dataclass(frozen=True, slots=True)
class SyncConfig:
    # withhold: entries of engines not in SCORED_STATES count 0; downweight: their scores are
    # multiplied by unsynced_weight
    unsynced_scores: str = "withhold"
    unsynced_weight: float = 0.5
    stale_after_s: float = 30.0  # silence before an engine is probed / marked unsynced
    drop_after_s: float = 300.0  # silence before its entries are dropped
    degraded_for_s: float = 300.0  # an unrepairable loss is reported this long

    def __post_init__(self) -> None:
        if self.unsynced_scores not in ("withhold", "downweight"):
            raise ValueError(
                f"unsynced_scores must be withhold or downweight, not {self.unsynced_scores!r}"
            )
        if not 0.0 <= self.unsynced_weight <= 1.0:
            raise ValueError(f"unsynced_weight must be in [0, 1], got {self.unsynced_weight}")
        if self.stale_after_s <= 0 or self.drop_after_s < self.stale_after_s:
            raise ValueError(
                "stale_after_s must be > 0 and drop_after_s >= stale_after_s "
                f"(got {self.stale_after_s}, {self.drop_after_s})"
            )
        if self.degraded_for_s < 0:
            raise ValueError(f"degraded_for_s must be >= 0, got {self.degraded_for_s}")

    @property
    def unsynced_factor(self) -> float:
        return 0.0 if self.unsynced_scores == "withhold" else self.unsynced_weight


@dataclass(slots=True)
class EngineSync:
    """One engine's sync record. The table replaces it on every state change and updates
    ``last_seen`` in place (once per batch: the ingest hot path)."""

    engine: str
    state: SyncState
    reason: SyncReason
    since: float  # when it entered this state
    last_seen: float  # newest batch (live, replayed, or a probe's answer)
    degraded_until: float = 0.0  # > now: a loss is being reported
    lost_batches: int = 0  # batches lost for good, in total
    last_probe: float = float("-inf")  # newest liveness probe started
    dropped: bool = False  # entries dropped after drop_after_s of silence

    def scored(self) -> bool:
        return self.state in SCORED_STATES

    def to_builtins(self, now: float) -> dict[str, object]:
        out: dict[str, object] = {
            "state": self.state.value,
            "reason": self.reason.value,
            "for_s": round(max(0.0, now - self.since), 3),
            "silent_s": round(max(0.0, now - self.last_seen), 3),
            "lost_batches": self.lost_batches,
        }
        if self.state is SyncState.DEGRADED:
            out["degraded_for_s"] = round(max(0.0, self.degraded_until - now), 3)
        return out


@dataclass(frozen=True, slots=True)
class SyncTick:
    """What :meth:`SyncTable.tick` asks the caller to do."""

    probe: tuple[str, ...] = ()  # silent for stale_after_s: probe (replay), or call silent()
    drop: tuple[str, ...] = ()  # silent for drop_after_s: drop its entries, call dropped()
    changed: tuple[str, ...] = ()  # state changed inside tick (degraded loss aged out)


@dataclass(slots=True)
class SyncTable:
    """The sync records of every engine. Only one thread writes (the ingest thread)."""

    config: SyncConfig = field(default_factory=SyncConfig)
    _records: dict[str, EngineSync] = field(default_factory=dict)
    # engine -> score factor, only for engines not scored as they are; replaced on change
    factors: Mapping[str, float] = field(default_factory=dict)
    # called with (engine, new state) on every state change, (engine, None) when forgotten
    listener: Callable[[str, SyncState | None], None] | None = None

    # -- reads -----------------------------------------------------------------------------

    def get(self, engine: str) -> EngineSync | None:
        return self._records.get(engine)

    def state(self, engine: str) -> SyncState | None:
        record = self._records.get(engine)
        return None if record is None else record.state

    def records(self) -> list[EngineSync]:
        """Sorted by engine. Safe from other threads: dict.copy() runs under the GIL as one
        C call, so it never sees the dict mid-change."""
        records = self._records.copy()
        return [records[k] for k in sorted(records)]

    def __len__(self) -> int:
        return len(self._records)

    # -- transitions -------------------------------------------------------------------------

    def known(self, engine: str, now: float) -> EngineSync:
        """An engine known (discovery) or seen: unsynced(no_events) until its stream tells."""
        record = self._records.get(engine)
        if record is None:
            record = EngineSync(engine, SyncState.UNSYNCED, SyncReason.NO_EVENTS, now, now)
            self._put(record)
        return record

    def synced(self, engine: str, now: float, reason: SyncReason) -> None:
        """The index holds the engine's whole stream (it began at seq 0, or a replay proved
        nothing is missing): synced, or degraded while a loss is still reported."""
        record = self.known(engine, now)
        self._settle(replace(record, last_seen=now, dropped=False), now, reason)

    def seen(self, engine: str, now: float) -> None:
        """A batch (or a probe's answer) arrived in order. Ends silence; nothing else."""
        record = self._records.get(engine) or self.known(engine, now)
        if record.state is SyncState.UNSYNCED and record.reason is SyncReason.SILENT:
            self._settle(replace(record, last_seen=now), now, SyncReason.RESUMED)
        else:
            record.last_seen = now
            record.dropped = False  # it speaks again: silence counts anew

    def replaying(self, engine: str, now: float, reason: SyncReason) -> None:
        """A replay that decides what the index holds started."""
        record = self.known(engine, now)
        self._put(
            replace(
                record,
                state=SyncState.REPLAYING,
                reason=reason,
                since=now,
                last_seen=now,
                dropped=False,
            )
        )

    def replayed(self, engine: str, now: float) -> None:
        """The replay ended (losses it found were reported with :meth:`lost` before)."""
        record = self.known(engine, now)
        if record.state is SyncState.REPLAYING:
            self._settle(replace(record, last_seen=now), now, SyncReason.REPLAYED)

    def lost(self, engine: str, now: float, batches: int) -> None:
        """An unrepairable loss: the caller cleared the engine's entries (or never had the
        lost ones) and rebuilds from what is left. Degraded for degraded_for_s from now; a
        running replay keeps the engine replaying (it ends degraded)."""
        record = self.known(engine, now)
        record = replace(
            record,
            degraded_until=now + self.config.degraded_for_s,
            lost_batches=record.lost_batches + max(0, batches),
        )
        if record.state is SyncState.REPLAYING or (
            record.state is SyncState.UNSYNCED and record.reason is not SyncReason.SILENT
        ):
            self._records[engine] = record
        else:
            self._settle(record, now, SyncReason.LOST)

    def restarted(self, engine: str, now: float) -> None:
        """The engine restarted and its entries were cleared: earlier losses are moot (its
        new cache starts empty). Synced from the new stream's start."""
        record = self.known(engine, now)
        record = replace(record, degraded_until=0.0, last_seen=now, dropped=False)
        self._put(replace(record, state=SyncState.SYNCED, reason=SyncReason.RESTART, since=now))

    def unavailable(self, engine: str, now: float) -> None:
        """The index refused a write of this engine: unsynced until it is replayed."""
        record = self.known(engine, now)
        if record.state is not SyncState.UNSYNCED or record.reason is SyncReason.SILENT:
            self._put(
                replace(
                    record,
                    state=SyncState.UNSYNCED,
                    reason=SyncReason.INDEX_UNAVAILABLE,
                    since=now,
                )
            )

    def probing(self, engine: str, now: float) -> None:
        """A liveness probe (a replay from the newest applied seq) was sent."""
        record = self.known(engine, now)
        self._records[engine] = replace(record, last_probe=now)

    def silent(self, engine: str, now: float) -> None:
        """No batch for stale_after_s and no probe answered: withheld until it speaks."""
        record = self.known(engine, now)
        if record.state in SCORED_STATES:
            self._put(
                replace(record, state=SyncState.UNSYNCED, reason=SyncReason.SILENT, since=now)
            )

    def dropped(self, engine: str, now: float) -> None:
        """The caller dropped the entries of an engine silent for drop_after_s."""
        record = self.known(engine, now)
        self._put(
            replace(
                record,
                state=SyncState.UNSYNCED,
                reason=SyncReason.DEAD,
                since=now,
                dropped=True,
            )
        )

    def mirror(self, engine: str, now: float, state: SyncState, reason: SyncReason) -> None:
        """The engine is written by another replica (one writer per stream): take the state
        it publishes (OTHER_WRITER), or unsynced (NO_WRITER) while nobody writes it."""
        record = self.known(engine, now)
        if record.state is state and record.reason is reason:
            record.last_seen = now
            return
        self._put(
            replace(
                record, state=state, reason=reason, since=now, last_seen=now, degraded_until=0.0
            )
        )

    def forget(self, engine: str) -> None:
        if self._records.pop(engine, None) is None:
            return
        if engine in self.factors:
            self._refresh()
        if self.listener is not None:
            self.listener(engine, None)

    def tick(self, now: float) -> SyncTick:
        """Time passes: losses age out; silent engines are to be probed, dead ones dropped."""
        probe: list[str] = []
        drop: list[str] = []
        changed: list[str] = []
        stale, dead = self.config.stale_after_s, self.config.drop_after_s
        for engine, record in list(self._records.items()):
            if (
                record.state is SyncState.DEGRADED
                and now >= record.degraded_until
                and record.degraded_until
            ):
                self._settle(record, now, SyncReason.LOSS_AGED)
                changed.append(engine)
                record = self._records[engine]
            if record.reason is SyncReason.NO_EVENTS or record.state is SyncState.REPLAYING:
                continue  # nothing to lose yet / a replay has its own timeout
            silence = now - record.last_seen
            if silence > dead and not record.dropped:
                drop.append(engine)
            elif silence > stale and now - record.last_probe > stale and not record.dropped:
                probe.append(engine)
        return SyncTick(tuple(probe), tuple(drop), tuple(changed))

    # -- internals ---------------------------------------------------------------------------

    def _settle(self, record: EngineSync, now: float, reason: SyncReason) -> None:
        state = SyncState.DEGRADED if record.degraded_until > now else SyncState.SYNCED
        if state is not SyncState.DEGRADED:
            record = replace(record, degraded_until=0.0)
        self._put(replace(record, state=state, reason=reason, since=now))

    def _put(self, record: EngineSync) -> None:
        old = self._records.get(record.engine)
        self._records[record.engine] = record
        if old is None or old.scored() != record.scored():
            self._refresh()
        if self.listener is not None and (old is None or old.state is not record.state):
            self.listener(record.engine, record.state)

    def _refresh(self) -> None:
        factor = self.config.unsynced_factor
        self.factors = {
            engine: factor for engine, record in self._records.items() if not record.scored()
        }
