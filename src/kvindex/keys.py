"""Content keys: our own chained 64-bit block identities, computed the same way from an
engine's BlockStored ``token_ids`` and from a request's prompt tokens, so that a request and
the blocks it would reuse always meet, whatever hash algorithm, seed or block size the engine
uses.

Byte layout (see docs/keys.md):

* root  = XXH3-64(seed=0, b"kvindex/v1\\x00" + utf8(model) + b"\\x00" + utf8(lora or ""))
* key_i = XXH3-64(seed=key_{i-1}, u32le(token_0) ... u32le(token_{B-1}) + extra_i)

where ``key_{-1}`` is the root, ``B`` the canonical block size (default 16) and ``extra_i`` is
empty for a block without extra identity, else ``b"\\xff"`` followed by, in this order, one
``b"m" + u32le(len) + utf8(identifier) + i32le(offset)`` per multimodal item overlapping the
block, ``b"s" + u32le(len) + utf8(cache_salt)`` on the first block of a chain, and
``b"e" + u32le(len) + digest`` per prompt-embedding digest. Token ids must fit in 32 bits.

The model (base model name) and the LoRA adapter root the chain, so blocks of one model or
adapter never match a request for another.
"""

from __future__ import annotations

import struct
import sys
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field

import xxhash

try:  # the C fast path for chains without extras (bit-exact; tests/kvindex/test_native_keys.py)
    from kvindex._native import chain_keys as _native_chain_keys
except ImportError:  # built without a compiler
    _native_chain_keys = None  # type: ignore[assignment]

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "BlockExtra",
    "ContentKey",
    "SharedPrefixIds",
    "chain_keys",
    "prefix_chain_keys",
    "root_key",
]

ContentKey = int
"""One of our 64-bit block keys (unsigned)."""

DEFAULT_BLOCK_SIZE = 16

_ROOT_PREFIX = b"kvindex/v1\x00"
_EXTRA_MARK = b"\xff"
_u32 = struct.Struct("<I")
_i32 = struct.Struct("<i")
_xxh3 = xxhash.xxh3_64_intdigest
# array("I") is native-endian 32-bit; the layout is little-endian.
assert array("I").itemsize == 4, "kvindex needs a platform with 32-bit C unsigned int"
_SWAP = sys.byteorder != "little"


@dataclass(frozen=True, slots=True)
class BlockExtra:
    """The extra identity of one canonical block, besides its tokens."""

    mm: tuple[tuple[str, int], ...] = ()  # (identifier, offset of the item from block start)
    cache_salt: str | None = None  # first block of a chain only
    embeds: tuple[bytes, ...] = field(default=())

    def encode(self) -> bytes:
        parts = [_EXTRA_MARK]
        for identifier, offset in self.mm:
            raw = identifier.encode()
            parts += (b"m", _u32.pack(len(raw)), raw, _i32.pack(offset))
        if self.cache_salt is not None:
            raw = self.cache_salt.encode()
            parts += (b"s", _u32.pack(len(raw)), raw)
        for digest in self.embeds:
            parts += (b"e", _u32.pack(len(digest)), digest)
        return b"".join(parts)

    def __bool__(self) -> bool:
        return bool(self.mm or self.cache_salt is not None or self.embeds)


def root_key(model: str, lora: str | None = None) -> ContentKey:
    """The chain root of a (base model, LoRA adapter) pair."""
    return _xxh3(_ROOT_PREFIX + model.encode() + b"\x00" + (lora or "").encode())


def chain_keys(
    parent: ContentKey,
    token_ids: Sequence[int],
    block_size: int = DEFAULT_BLOCK_SIZE,
    extras: Sequence[BlockExtra | None] | None = None,
) -> list[ContentKey]:
    """Keys of the full canonical blocks of ``token_ids``, chained from ``parent`` (a root or
    the key of the block before). A trailing partial block gets no key. ``extras[i]`` is the
    extra identity of canonical block ``i`` (None or shorter: none).

    Raises OverflowError if a token id does not fit in 32 bits (or is negative)."""
    if not extras and _native_chain_keys is not None:
        fast = _native_chain_keys(parent, token_ids, block_size)
        if fast is not None:  # None: a case the C path leaves to this one
            return fast
    full = len(token_ids) // block_size
    if full == 0:
        return []
    packed = array("I", token_ids[: full * block_size])
    if _SWAP:
        packed.byteswap()
    buf = memoryview(packed.tobytes())
    step = block_size * 4
    keys: list[ContentKey] = []
    key = parent
    if not extras:
        for start in range(0, full * step, step):
            key = _xxh3(buf[start : start + step], key)
            keys.append(key)
        return keys
    for i in range(full):
        data = buf[i * step : (i + 1) * step]
        extra = extras[i] if i < len(extras) else None
        key = _xxh3(bytes(data) + extra.encode(), key) if extra else _xxh3(data, key)
        keys.append(key)
    return keys


class SharedPrefixIds(list[int]):
    """Token ids whose first `lead` entries are a prefix other prompts share (the
    tokenizer's prefix memo hands these out). `lead_keys` belongs to that prefix and keeps,
    per (chain root, block size, lead), the keys of its full blocks, so that the next prompt
    starting with it hashes only what follows (`prefix_chain_keys`); the lead length tells
    the prefix with and without special tokens before it apart. A plain list otherwise;
    the ids must not be changed in place (no one does)."""

    __slots__ = ("lead", "lead_keys")

    lead: int
    lead_keys: dict[tuple[ContentKey, int, int], list[ContentKey]]


# (Root, block size, lead) combinations one shared prefix keeps keys for.
_LEAD_KEY_SETS = 4


def prefix_chain_keys(
    parent: ContentKey, token_ids: Sequence[int], block_size: int = DEFAULT_BLOCK_SIZE
) -> list[ContentKey]:
    """`chain_keys(parent, token_ids, block_size)`, reusing the keys of a shared prefix's
    full blocks when `token_ids` is a SharedPrefixIds (keys chain block by block, so the
    blocks after them chain from the last one)."""
    if not isinstance(token_ids, SharedPrefixIds):
        return chain_keys(parent, token_ids, block_size)
    full = token_ids.lead // block_size
    if full == 0:
        return chain_keys(parent, token_ids, block_size)
    cache = token_ids.lead_keys
    key = (parent, block_size, token_ids.lead)
    head = cache.get(key)
    if head is None:
        head = chain_keys(parent, token_ids[: full * block_size], block_size)
        if len(cache) >= _LEAD_KEY_SETS:
            cache.clear()
        cache[key] = head
    return head + chain_keys(head[-1], token_ids[full * block_size :], block_size)
