"""The C XXH3-64 and chain-key fast path (kvindex._native) are bit-exact with the xxhash
package (the definition docs/keys.md uses), on every input length the fast path handles."""

from __future__ import annotations

import struct

import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from kvindex import keys as keys_module
from kvindex.index import StoredBlock
from kvindex.index.native import NATIVE_AVAILABLE
from kvindex.keys import BlockExtra, chain_keys, root_key

pytestmark = pytest.mark.skipif(not NATIVE_AVAILABLE, reason="kvindex._native not built")

if NATIVE_AVAILABLE:
    from kvindex import _native

seeds = st.one_of(st.integers(0, 2**64 - 1), st.sampled_from([0, 1, 2**63, 2**64 - 1]))


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=240), seeds)
def test_xxh3_64_matches_xxhash(data: bytes, seed: int) -> None:
    assert _native.xxh3_64(data, seed) == xxhash.xxh3_64_intdigest(data, seed)


def test_xxh3_64_every_length() -> None:
    for n in range(241):
        data = bytes((i * 131 + n) % 256 for i in range(n))
        for seed in (0, 7, 2**64 - 1, 0x9E3779B185EBCA87):
            assert _native.xxh3_64(data, seed) == xxhash.xxh3_64_intdigest(data, seed), n
    assert _native.xxh3_64(bytes(241), 0) is None  # longer inputs: the xxhash package


def reference_chain(parent: int, tokens: list[int], block: int) -> list[int]:
    out, key = [], parent
    for b in range(len(tokens) // block):
        data = struct.pack(f"<{block}I", *tokens[b * block : (b + 1) * block])
        key = xxhash.xxh3_64_intdigest(data, key)
        out.append(key)
    return out


@settings(max_examples=500, deadline=None)
@given(
    seeds,
    st.lists(st.integers(0, 2**32 - 1), max_size=200),
    st.integers(1, 70),  # > 60 (240 bytes): the Python path
    st.booleans(),
)
def test_chain_keys_fast_path_is_exact(
    parent: int, tokens: list[int], block: int, as_tuple: bool
) -> None:
    given_tokens = tuple(tokens) if as_tuple else tokens
    expected = reference_chain(parent, tokens, block)
    assert chain_keys(parent, given_tokens, block) == expected
    fast = _native.chain_keys(parent, given_tokens, block)
    assert fast == (expected if block <= 60 else None)


def test_chain_keys_errors_match_the_python_path(monkeypatch: pytest.MonkeyPatch) -> None:
    cases: list[tuple[int, list[object]]] = [
        (1, [-1] * 16),
        (1, [2**32] + [0] * 15),
        (1, [1.5] * 16),
        (1, [2**32] * 8),  # partial block only: not checked, no keys
    ]
    results = []
    for use_native in (True, False):
        if not use_native:
            monkeypatch.setattr(keys_module, "_native_chain_keys", None)
        row = []
        for parent, tokens in cases:
            try:
                row.append(chain_keys(parent, tokens, 16))  # type: ignore[arg-type]
            except (OverflowError, TypeError) as exc:
                row.append(type(exc))
        results.append(row)
    assert results[0] == results[1] == [OverflowError, OverflowError, TypeError, []]


def test_extras_and_roots_unchanged() -> None:
    root = root_key("m")
    tokens = list(range(48))
    extras = [None, BlockExtra(cache_salt="s"), None]
    plain = chain_keys(root, tokens)
    salted = chain_keys(root, tokens, 16, extras)
    assert plain == reference_chain(root, tokens, 16)
    assert salted[0] == plain[0] and salted[1] != plain[1]


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.one_of(st.integers(-(2**63), 2**64 - 1), st.binary(max_size=32)), max_size=20),
    st.integers(1, 4),
)
def test_stored_blocks_equal_python_construction(hashes: list[object], split: int) -> None:
    keys = list(range(1000, 1000 + len(hashes) * split))
    local: dict[object, int] = {}
    made = _native.stored_blocks(StoredBlock, hashes, keys, split, local)  # type: ignore[arg-type]
    expected = [
        StoredBlock(h, tuple(keys[i * split : (i + 1) * split]))  # type: ignore[arg-type]
        for i, h in enumerate(hashes)
    ]
    assert made == expected
    assert made is not None and all(type(b) is StoredBlock for b in made)
    assert [hash(b) for b in made] == [hash(b) for b in expected]
    assert local == {b.engine_hash: b.keys[-1] for b in expected}
    if made:
        with pytest.raises(AttributeError):  # still frozen
            made[0].keys = ()  # type: ignore[misc]
    with pytest.raises(ValueError):
        _native.stored_blocks(StoredBlock, [*hashes, 1], keys, split, {})  # type: ignore[arg-type]
    assert _native.stored_blocks(StoredBlock, tuple(hashes), keys, split, {}) is None  # type: ignore[arg-type]
