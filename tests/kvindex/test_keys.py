from __future__ import annotations

import struct

import pytest
import xxhash
from hypothesis import given
from hypothesis import strategies as st

from kvindex.keys import BlockExtra, SharedPrefixIds, chain_keys, prefix_chain_keys, root_key


def test_byte_layout_is_as_documented() -> None:
    root = xxhash.xxh3_64_intdigest(b"kvindex/v1\x00model\x00")
    assert root_key("model") == root
    tokens = list(range(16))
    data = struct.pack("<16I", *tokens)
    assert chain_keys(root, tokens) == [xxhash.xxh3_64_intdigest(data, root)]
    salted = BlockExtra(cache_salt="s", mm=(("img", -3),))
    extra = b"\xff" + b"m" + struct.pack("<I", 3) + b"img" + struct.pack("<i", -3)
    extra += b"s" + struct.pack("<I", 1) + b"s"
    assert chain_keys(root, tokens, extras=[salted]) == [
        xxhash.xxh3_64_intdigest(data + extra, root)
    ]


def test_models_and_adapters_root_apart() -> None:
    roots = {root_key("a"), root_key("b"), root_key("a", "lora1"), root_key("a", "lora2")}
    assert len(roots) == 4


def test_partial_block_has_no_key_and_chain_depends_on_prefix() -> None:
    root = root_key("m")
    assert chain_keys(root, list(range(15))) == []
    a = chain_keys(root, list(range(32)))
    b = chain_keys(root, [0, *range(1, 16), *range(100, 116)])
    assert a[0] == b[0] and a[1] != b[1]
    assert chain_keys(root, [99, *range(1, 32)])[1] != a[1]  # same block 2, other block 1


@given(st.lists(st.integers(0, 2**32 - 1), max_size=200), st.integers(1, 64))
def test_chaining_is_incremental(tokens: list[int], block_size: int) -> None:
    root = root_key("m")
    whole = chain_keys(root, tokens, block_size)
    cut = (len(whole) // 2) * block_size
    first = chain_keys(root, tokens[:cut], block_size)
    rest = chain_keys(first[-1] if first else root, tokens[cut:], block_size)
    assert whole == first + rest
    assert len(whole) == len(tokens) // block_size


def test_token_out_of_range() -> None:
    with pytest.raises(OverflowError):
        chain_keys(0, [-1] * 16)
    with pytest.raises(OverflowError):
        chain_keys(0, [2**32] * 16)


_ids = st.lists(st.integers(min_value=0, max_value=2**32 - 1), max_size=120)


@given(
    lead=_ids,
    tails=st.lists(_ids, min_size=1, max_size=4),
    block=st.sampled_from([1, 3, 16]),
    roots=st.lists(st.integers(min_value=0, max_value=2**64 - 1), min_size=1, max_size=6),
)
def test_shared_prefix_keys_equal_the_full_chain(
    lead: list[int], tails: list[list[int]], block: int, roots: list[int]
) -> None:
    """Prompts sharing one prefix (and its key cache) get exactly chain_keys' keys, for any
    prefix length (on or off a block boundary), tail, block size and roots (more roots
    than the cache keeps)."""
    cache: dict[tuple[int, int, int], list[int]] = {}
    for tail in tails:
        for root in roots:
            ids = SharedPrefixIds(lead + tail)
            ids.lead, ids.lead_keys = len(lead), cache
            assert prefix_chain_keys(root, ids, block) == chain_keys(root, lead + tail, block)
    assert len(cache) <= 4
    plain = lead + tails[0]
    assert prefix_chain_keys(roots[0], plain, block) == chain_keys(roots[0], plain, block)
