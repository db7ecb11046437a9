"""vLLM prefix-cache block hashes, computed exactly as vLLM 0.33 does (pure, no I/O).

vLLM hashes each *full* block as ``H((parent_digest, tuple(block_token_ids), extra_keys))``
where the first block's parent is ``NONE_HASH = H(seed_string)``. ``H`` is one of four
algorithms (``--prefix-caching-hash-algo``):

* ``sha256``      pickle protocol 5 of the triple, then SHA-256 (32-byte digest)
* ``sha256_cbor`` canonical CBOR of the triple, then SHA-256 (32 bytes)
* ``xxhash``      pickle protocol 5, then XXH3-128 (16 bytes, big-endian canonical form)
* ``xxhash_cbor`` canonical CBOR, then XXH3-128 (16 bytes)

The CBOR encoder is our own (only the types the triple needs); the tests cross-check it
against ``cbor2.dumps(..., canonical=True)``, which is what vLLM calls. Pickle is the
standard library's, as in vLLM (the pickle bytes of ints, bytes, str, tuples and None are
stable across CPython 3.8+).

Events on the wire carry ``wire_value(digest)``: the last 8 bytes read big-endian (uint64).
See docs/vllm-hash.md.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, TypeAlias

import xxhash

HashAlgo: TypeAlias = Literal["sha256", "sha256_cbor", "xxhash", "xxhash_cbor"]
HASH_ALGOS: tuple[HashAlgo, ...] = ("sha256", "sha256_cbor", "xxhash", "xxhash_cbor")

# vLLM's fallback seed string for the sha256 variants when PYTHONHASHSEED is unset.
DEFAULT_SHA256_SEED = "vllm-none-hash"

# A hashable CBOR/pickle value: what vLLM feeds its hash functions.
HashInput: TypeAlias = "int | bytes | str | bool | tuple[HashInput, ...] | list[HashInput] | None"
ExtraKeys: TypeAlias = "tuple[HashInput, ...] | None"


# --------------------------------------------------------------------------- canonical CBOR


def _cbor_head(major: int, value: int) -> bytes:
    """Initial byte plus argument in the shortest form (RFC 8949 preferred serialisation)."""
    if value < 24:
        return bytes([(major << 5) | value])
    if value < 0x100:
        return bytes([(major << 5) | 24, value])
    if value < 0x10000:
        return bytes([(major << 5) | 25]) + struct.pack(">H", value)
    if value < 0x100000000:
        return bytes([(major << 5) | 26]) + struct.pack(">I", value)
    if value < 0x10000000000000000:
        return bytes([(major << 5) | 27]) + struct.pack(">Q", value)
    raise OverflowError(f"integer too large for a CBOR head: {value}")


def _cbor_bignum(tag: int, magnitude: int) -> bytes:
    # Tags 2/3 (positive/negative bignum) with the minimal big-endian byte string, as cbor2.
    raw = magnitude.to_bytes((magnitude.bit_length() + 7) // 8, "big")
    return _cbor_head(6, tag) + _cbor_head(2, len(raw)) + raw


_PACK_U8 = struct.Struct(">BB").pack
_PACK_U16 = struct.Struct(">BH").pack
_PACK_U32 = struct.Struct(">BI").pack


def _append_uint(out: bytearray, value: int) -> None:
    # Inlined shortest-form heads for major type 0: the hot path of every token array.
    if value < 24:
        out.append(value)
    elif value < 0x100:
        out += _PACK_U8(24, value)
    elif value < 0x10000:
        out += _PACK_U16(25, value)
    elif value < 0x100000000:
        out += _PACK_U32(26, value)
    else:
        out += _cbor_head(0, value)


def _cbor_append(out: bytearray, obj: object) -> None:
    # bool before int: bool is a subclass of int in Python.
    if obj is None:
        out.append(0xF6)
    elif obj is True:
        out.append(0xF5)
    elif obj is False:
        out.append(0xF4)
    elif isinstance(obj, int):
        if obj >= 0:
            out += _cbor_head(0, obj) if obj < 1 << 64 else _cbor_bignum(2, obj)
        else:
            magnitude = -1 - obj
            out += _cbor_head(1, magnitude) if magnitude < 1 << 64 else _cbor_bignum(3, magnitude)
    elif isinstance(obj, bytes | bytearray | memoryview):
        data = bytes(obj)
        out += _cbor_head(2, len(data))
        out += data
    elif isinstance(obj, str):
        data = obj.encode("utf-8")
        out += _cbor_head(3, len(data))
        out += data
    elif isinstance(obj, tuple | list):
        out += _cbor_head(4, len(obj))
        for item in obj:
            # Fast path for token ids (the bulk of every hash input).
            if type(item) is int and 0 <= item < 1 << 64:
                _append_uint(out, item)
            else:
                _cbor_append(out, item)
    else:
        raise TypeError(f"cannot CBOR-encode {type(obj).__name__} in a block hash input")


def cbor_encode(obj: object) -> bytes:
    """Canonical CBOR of None, bools, ints (any size), bytes, str, tuples and lists."""
    out = bytearray()
    _cbor_append(out, obj)
    return bytes(out)


# --------------------------------------------------------------------------- hash functions


def _xxh3_128(data: bytes) -> bytes:
    # xxhash's *_digest is the canonical (big-endian) 16-byte form, as vLLM uses.
    return bytes(xxhash.xxh3_128_digest(data))


def _pickle5(obj: object) -> bytes:
    return pickle.dumps(obj, protocol=5)


HASH_FUNCTIONS: Mapping[HashAlgo, Callable[[object], bytes]] = {
    "sha256": lambda obj: hashlib.sha256(_pickle5(obj)).digest(),
    "sha256_cbor": lambda obj: hashlib.sha256(cbor_encode(obj)).digest(),
    "xxhash": lambda obj: _xxh3_128(_pickle5(obj)),
    "xxhash_cbor": lambda obj: _xxh3_128(cbor_encode(obj)),
}

DIGEST_SIZES: Mapping[HashAlgo, int] = {
    "sha256": 32,
    "sha256_cbor": 32,
    "xxhash": 16,
    "xxhash_cbor": 16,
}


def check_algo(algo: str) -> HashAlgo:
    """Return `algo` typed, or raise ValueError naming the valid choices."""
    for known in HASH_ALGOS:
        if algo == known:
            return known
    raise ValueError(f"unknown hash algorithm {algo!r}; choose one of {', '.join(HASH_ALGOS)}")


def hash_object(algo: HashAlgo, obj: object) -> bytes:
    return HASH_FUNCTIONS[algo](obj)


# --------------------------------------------------------------------------- NONE_HASH / seed


def default_seed(algo: HashAlgo, environ: Mapping[str, str] | None = None) -> str | None:
    """The seed string vLLM would use: PYTHONHASHSEED if set; else "vllm-none-hash" for the
    sha256 variants; else None (xxhash variants are then random per process)."""
    env = os.environ if environ is None else environ
    seed = env.get("PYTHONHASHSEED")
    if seed is not None:
        return seed
    if algo in ("sha256", "sha256_cbor"):
        return DEFAULT_SHA256_SEED
    return None


def none_hash(algo: HashAlgo, seed: str | None) -> bytes:
    """NONE_HASH, the first block's parent: H(seed). `seed=None` reproduces vLLM's
    unseeded behaviour (32 random bytes, so hashes differ per process)."""
    if seed is None:
        return os.urandom(32)
    return hash_object(algo, seed)


# --------------------------------------------------------------------------- extra keys


@dataclass(frozen=True, slots=True)
class MultiModalItem:
    """A multimodal placeholder run in the prompt: `length` tokens starting at `offset`."""

    identifier: str
    offset: int
    length: int


@dataclass(frozen=True, slots=True)
class RequestExtras:
    """What besides tokens goes into a request's block hashes (vLLM 0.33 extra keys)."""

    lora_name: str | None = None
    lora_path: str | None = None
    mm_items: tuple[MultiModalItem, ...] = ()
    cache_salt: str | None = None
    # One digest per *block index*, for prompt-embedding requests (sha256 of the block's
    # embeddings, computed by the caller).
    prompt_embeds_digests: Mapping[int, bytes] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return (
            self.lora_name is None
            and not self.mm_items
            and not self.cache_salt
            and not self.prompt_embeds_digests
        )

    def _mm_in_block(self, start: int, end: int) -> list[tuple[str, int]]:
        # Items overlapping [start, end), with their offset relative to the block start
        # (negative when the item began in an earlier block).
        return [
            (item.identifier, item.offset - start)
            for item in self.mm_items
            if item.offset < end and item.offset + item.length > start
        ]

    def hash_keys(self, block_index: int, block_size: int) -> ExtraKeys:
        """Tagged extra keys that vLLM 0.33 hashes for this block, or None."""
        start, end = block_index * block_size, (block_index + 1) * block_size
        keys: list[HashInput] = []
        if self.lora_name is not None:
            keys.append(("lora", self.lora_name, self.lora_path))
        keys.extend(("mm", ident, off) for ident, off in self._mm_in_block(start, end))
        if start == 0 and self.cache_salt:
            keys.append(("cache_salt", self.cache_salt))
        digest = self.prompt_embeds_digests.get(block_index)
        if digest is not None:
            keys.append(("prompt_embeds", digest))
        return tuple(keys) if keys else None

    def event_keys(self, block_index: int, block_size: int) -> ExtraKeys:
        """Untagged extra keys as BlockStored.extra_keys publishes them, or None."""
        start, end = block_index * block_size, (block_index + 1) * block_size
        keys: list[HashInput] = []
        if self.lora_name is not None:
            keys.append(self.lora_name)
        keys.extend(self._mm_in_block(start, end))
        if start == 0 and self.cache_salt:
            keys.append(self.cache_salt)
        digest = self.prompt_embeds_digests.get(block_index)
        if digest is not None:
            keys.append(digest)
        return tuple(keys) if keys else None


# --------------------------------------------------------------------------- block hashes


def hash_block(
    algo: HashAlgo, parent: bytes, block_token_ids: Sequence[int], extra_keys: ExtraKeys
) -> bytes:
    """One block's digest: H((parent, tuple(tokens), extra_keys))."""
    return hash_object(algo, (parent, tuple(block_token_ids), extra_keys))


def block_hashes(
    token_ids: Sequence[int],
    block_size: int,
    algo: HashAlgo = "sha256_cbor",
    seed: str | None = "0",
    extra_keys_per_block: Sequence[ExtraKeys] | None = None,
    parent: bytes | None = None,
) -> list[bytes]:
    """Digests of every full block of `token_ids` (a trailing partial block is not hashed).

    `parent` continues a chain (defaults to NONE_HASH of `seed`); `extra_keys_per_block[i]`
    is the (tagged) extra-key tuple of block i, or None.
    """
    if block_size <= 0:
        raise ValueError(f"block size must be positive, got {block_size}")
    num_full = len(token_ids) // block_size
    if extra_keys_per_block is not None and len(extra_keys_per_block) < num_full:
        raise ValueError(
            f"extra_keys_per_block has {len(extra_keys_per_block)} entries, "
            f"need one per full block ({num_full})"
        )
    prev = none_hash(algo, seed) if parent is None else parent
    digests: list[bytes] = []
    for i in range(num_full):
        extra = extra_keys_per_block[i] if extra_keys_per_block is not None else None
        prev = hash_block(algo, prev, token_ids[i * block_size : (i + 1) * block_size], extra)
        digests.append(prev)
    return digests


def request_block_hashes(
    token_ids: Sequence[int],
    block_size: int,
    extras: RequestExtras,
    algo: HashAlgo = "sha256_cbor",
    seed: str | None = "0",
) -> list[bytes]:
    """Block digests of a request with LoRA / multimodal / cache-salt extras applied."""
    num_full = len(token_ids) // block_size if block_size > 0 else 0
    keys = [extras.hash_keys(i, block_size) for i in range(num_full)]
    return block_hashes(token_ids, block_size, algo, seed, keys)


def wire_value(digest: bytes) -> int:
    """The uint64 vLLM publishes for a digest (VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=1)."""
    return int.from_bytes(digest[-8:], "big")
