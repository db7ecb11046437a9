"""Key names of the Redis index (docs/redis.md, "Key schema"). Pure: no I/O.

Every key of one index carries the same hash tag ``{prefix}``, so in Redis Cluster the whole
index lives in one hash slot: a prompt lookup is one server-side script (one round trip, one
node) and an event batch is one atomic script. The price is that one index does not spread
over shards; several indexes (e.g. one per model pool, each its own prefix) do.
"""

from __future__ import annotations

from dataclasses import dataclass

from redis.crc import key_slot

from kvindex.index.base import Tier
from kvindex.keys import ContentKey
from kvindex.wire import EngineHash

__all__ = ["RedisKeySchema", "encode_engine_hash"]

_FORBIDDEN = set("{}:*?[]\\ \t\r\n")


def encode_engine_hash(engine_hash: EngineHash) -> str:
    """An engine hash as a map field: decimal for ints, ``x`` + hex for bytes (never clash)."""
    if isinstance(engine_hash, bytes):
        return "x" + engine_hash.hex()
    return str(engine_hash)


@dataclass(frozen=True, slots=True)
class RedisKeySchema:
    prefix: str = "kvi"

    def __post_init__(self) -> None:
        if not self.prefix or _FORBIDDEN & set(self.prefix):
            raise ValueError(
                f"invalid Redis key prefix {self.prefix!r}: use a non-empty name without "
                "braces, colons, spaces or glob characters"
            )

    @property
    def base(self) -> str:
        """What every key starts with: the hash tag and a colon (``{kvi}:``)."""
        return "{" + self.prefix + "}:"

    @property
    def epoch(self) -> str:
        return self.base + "epoch"

    @property
    def lease(self) -> str:
        return self.base + "lease"

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

    @property
    def all_patterns(self) -> str:
        return self.base + "*"

    def hash_slot(self) -> int:
        """The Redis Cluster slot every key of this index maps to."""
        return int(key_slot(self.epoch.encode()))
