"""Key names of the Redis index (docs/redis.md, "Key schema"). Pure: no I/O.

An index is split into ``groups`` **engine groups** (docs/redis.md, "Sharding"): every engine
belongs to one group, and all keys of a group (its engines' holder bitmaps, maps, copy
counts, leases, applied positions) carry the group's hash tag, so in Redis Cluster a group
lives in one hash slot: an engine's event batch is one atomic script on one shard, and a
prompt lookup is one script per group (pipelined, early-terminating in each). With one group
(the default) the tag is ``{prefix}`` as it always was; with several, group tags are chosen
so their hash slots sit in the middle of equal bands of the slot space, so on a cluster whose
nodes own equal contiguous ranges (``redis-cli --cluster create``) groups spread evenly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from redis.crc import key_slot

from kvindex.index.base import Tier
from kvindex.keys import ContentKey
from kvindex.wire import EngineHash

__all__ = [
    "REDIS_SLOTS",
    "GroupKeys",
    "RedisKeySchema",
    "StreamPosition",
    "encode_engine_hash",
    "group_tag",
]


@dataclass(frozen=True, slots=True)
class StreamPosition:
    """Where an engine's stream stands in the index: the seq of the newest batch written for
    it and that batch's payload digest (xxh3-64; None when not known). A new writer resumes
    there and checks the engine still holds that very batch under that seq (docs/redis.md,
    "One writer per engine stream"). Stored as ``seq`` or ``seq:digest`` in the positions
    hash."""

    seq: int
    digest: int | None = None

    def encode(self) -> str:
        return str(self.seq) if self.digest is None else f"{self.seq}:{self.digest}"

    @classmethod
    def parse(cls, text: str) -> StreamPosition | None:
        """The stored form back ('' or malformed: None, as if none was recorded)."""
        seq, _, digest = text.partition(":")
        try:
            return cls(int(seq), int(digest) if digest else None)
        except ValueError:
            return None


_FORBIDDEN = set("{}:*?[]\\ \t\r\n")
REDIS_SLOTS = 16384
MAX_GROUPS = 1024


def encode_engine_hash(engine_hash: EngineHash) -> str:
    """An engine hash as a map field: decimal for ints, ``x`` + hex for bytes (never clash)."""
    if isinstance(engine_hash, bytes):
        return "x" + engine_hash.hex()
    return str(engine_hash)


def group_tag(prefix: str, group: int, groups: int) -> str:
    """The hash tag of one group: ``prefix`` alone for a single group, else ``prefix.N``
    with the smallest N whose slot lies in the middle half of band ``group`` of ``groups``."""
    if groups == 1:
        return prefix
    band = REDIS_SLOTS / groups
    low, high = group * band + band / 4, (group + 1) * band - band / 4
    n = 0
    while True:
        tag = f"{prefix}.{n}"
        if low <= key_slot(("{" + tag + "}").encode()) < high:
            return tag
        n += 1


@dataclass(frozen=True, slots=True)
class GroupKeys:
    """The keys of one engine group (all in the slot of ``{tag}``)."""

    tag: str

    @property
    def base(self) -> str:
        """What every key of the group starts with: the hash tag and a colon (``{kvi}:``)."""
        return "{" + self.tag + "}:"

    @property
    def epoch(self) -> str:
        return self.base + "epoch"

    @property
    def lease(self) -> str:  # the single writer lease (WriterLease)
        return self.base + "lease"

    def engine_lease(self, engine: str) -> str:  # per-engine writer lease (EngineLeases)
        return self.base + "lease:" + engine

    def engine_state(self, engine: str) -> str:  # the writer's sync state of that engine
        return self.base + "st:" + engine

    @property
    def positions(self) -> str:  # hash: engine -> StreamPosition.encode() (with its batch)
        return self.base + "seq"

    @property
    def engine_slots(self) -> str:  # hash: engine name -> slot
        return self.base + "eng"

    @property
    def slot_names(self) -> str:  # hash: slot -> engine name
        return self.base + "name"

    @property
    def free_slots(self) -> str:  # sorted set of freed slots (lowest reused first)
        return self.base + "free"

    @property
    def next_slot(self) -> str:  # counter: slots ever allocated
        return self.base + "next"

    def holders(self, tier: Tier, key: ContentKey) -> str:  # bitmap of engine slots
        return f"{self.base}h:{int(tier)}:{key}"

    @property
    def holders_pattern(self) -> str:
        return self.base + "h:*"

    def engine_map(self, slot: int, tier: Tier) -> str:  # hash: engine hash -> key[,key...]
        return f"{self.base}m:{slot}:{int(tier)}"

    def copies(self, slot: int, tier: Tier) -> str:  # hash: engine hash -> copy state
        return f"{self.base}c:{slot}:{int(tier)}"

    def hash_slot(self) -> int:
        return int(key_slot(self.epoch.encode()))


@dataclass(frozen=True, slots=True)
class RedisKeySchema:
    prefix: str = "kvi"
    groups: int = 1
    group_keys: tuple[GroupKeys, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.prefix or _FORBIDDEN & set(self.prefix):
            raise ValueError(
                f"invalid Redis key prefix {self.prefix!r}: use a non-empty name without "
                "braces, colons, spaces or glob characters"
            )
        if not 1 <= self.groups <= MAX_GROUPS:
            raise ValueError(f"groups must be in [1, {MAX_GROUPS}], got {self.groups}")
        keys = tuple(GroupKeys(group_tag(self.prefix, g, self.groups)) for g in range(self.groups))
        object.__setattr__(self, "group_keys", keys)

    def group(self, group: int) -> GroupKeys:
        return self.group_keys[group]

    # Group 0's keys under the old names: with one group they are the whole index; with
    # several, group 0 also holds the registry (engine -> group) and the replica members.
    @property
    def home(self) -> GroupKeys:
        return self.group_keys[0]

    @property
    def base(self) -> str:
        return self.home.base

    @property
    def epoch(self) -> str:
        return self.home.epoch

    @property
    def lease(self) -> str:
        return self.home.lease

    @property
    def engine_slots(self) -> str:
        return self.home.engine_slots

    @property
    def slot_names(self) -> str:
        return self.home.slot_names

    @property
    def free_slots(self) -> str:
        return self.home.free_slots

    @property
    def next_slot(self) -> str:
        return self.home.next_slot

    def holders(self, tier: Tier, key: ContentKey) -> str:
        return self.home.holders(tier, key)

    @property
    def holders_pattern(self) -> str:
        return self.home.holders_pattern

    def engine_map(self, slot: int, tier: Tier) -> str:
        return self.home.engine_map(slot, tier)

    @property
    def engine_groups(self) -> str:  # hash: engine -> group (several groups only)
        return self.home.base + "grp"

    @property
    def group_sizes(self) -> str:  # hash: group -> engines assigned
        return self.home.base + "gn"

    @property
    def members(self) -> str:  # sorted set: replica owner token -> expiry (ms, server time)
        return self.home.base + "members"

    @property
    def all_patterns(self) -> str:
        return self.base + "*"

    def hash_slot(self) -> int:
        """The Redis Cluster slot of group 0 (the whole index when there is one group)."""
        return self.home.hash_slot()

    def hash_slots(self) -> list[int]:
        return [g.hash_slot() for g in self.group_keys]
