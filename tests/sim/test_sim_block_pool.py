"""The block pool: prefix hits, reference counts, LRU eviction and its events."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from kvindex.vllm_hash import RequestExtras, block_hashes
from kvtools.sim.block_pool import BlockPool, KVGroupSpec
from kvtools.sim.events import AllBlocksCleared, BlockRemoved, BlockStored

BS = 4


def digests(tokens: list[int]) -> list[bytes]:
    return block_hashes(tokens, BS, "sha256_cbor", "0")


def run_request(pool: BlockPool, rid: str, prompt: list[int], extra: int = 0):  # type: ignore[no-untyped-def]
    d = digests(prompt)
    alloc, events = pool.allocate(rid, d, len(prompt), len(prompt) + extra, RequestExtras())
    events += pool.cache_blocks(alloc, d, prompt, announce_from=0)
    return alloc, events


def test_hit_reannounce_and_cap() -> None:
    pool = BlockPool(16, KVGroupSpec(block_size=BS))
    prompt = list(range(10))  # 2 full blocks + 2 tokens
    a1, ev1 = run_request(pool, "a", prompt)
    assert a1.hit_blocks == 0
    assert len(ev1) == 1 and isinstance(ev1[0], BlockStored)
    assert ev1[0].block_hashes == digests(prompt) and ev1[0].parent_block_hash is None
    assert ev1[0].token_ids == prompt[:8]
    pool.free(a1)
    a2, ev2 = run_request(pool, "b", prompt)
    assert a2.hit_blocks == 2
    # Hits are re-announced from block 0 with parent None.
    assert isinstance(ev2[0], BlockStored) and ev2[0].parent_block_hash is None
    assert ev2[0].block_hashes == digests(prompt)
    pool.free(a2)
    # A prompt of exactly 2 blocks can hit only 1 (one token must be computed).
    a3, _ = run_request(pool, "c", prompt[:8])
    assert a3.hit_blocks == 1


def test_ref_counts_keep_blocks_from_eviction() -> None:
    pool = BlockPool(4, KVGroupSpec(block_size=BS))
    a, _ = run_request(pool, "a", list(range(8)))
    assert pool.num_free == 2 and pool.usage == 0.5
    assert not pool.can_allocate(digests([9] * 12), 12, 12)
    pool.free(a)
    assert pool.num_free == 4 and pool.usage == 0.0
    assert pool.num_cached == 2  # still cached while free


def test_lru_eviction_emits_block_removed_tail_first() -> None:
    pool = BlockPool(4, KVGroupSpec(block_size=BS))
    first = list(range(8))
    a, _ = run_request(pool, "a", first)
    pool.free(a)
    b, ev = run_request(pool, "b", [100 + i for i in range(12)])
    removed = [e for e in ev if isinstance(e, BlockRemoved)]
    assert len(removed) == 1
    # Never-used blocks go first, then the freed chain tail-first.
    assert removed[0].block_hashes == [digests(first)[1]]
    assert removed[0].medium == "GPU" and removed[0].group_idx == 0
    assert pool.is_cached(digests(first)[0]) and not pool.is_cached(digests(first)[1])
    pool.free(b)


def test_decode_blocks_chain_on_parent() -> None:
    pool = BlockPool(8, KVGroupSpec(block_size=BS))
    prompt = list(range(6))
    a, _ = run_request(pool, "a", prompt, extra=6)
    tokens = [*prompt, 50, 51, 52, 53, 54, 55]
    d = digests(tokens)
    ev = pool.cache_blocks(a, d, tokens)
    assert len(ev) == 1 and isinstance(ev[0], BlockStored)
    assert ev[0].parent_block_hash == d[0] and ev[0].block_hashes == d[1:3]
    assert ev[0].token_ids == tokens[4:12]


def test_reset_and_sliding_window_group_fields() -> None:
    pool = BlockPool(8, KVGroupSpec(1, 8, "sliding_window", 128))
    d = block_hashes(list(range(16)), 8, "sha256_cbor", "0")
    alloc, _ = pool.allocate("a", d, 16, 16, RequestExtras(lora_name="sql"))
    (ev,) = pool.cache_blocks(alloc, d, list(range(16)), announce_from=0)
    assert isinstance(ev, BlockStored)
    assert (ev.group_idx, ev.kv_cache_spec_kind, ev.kv_cache_spec_sliding_window) == (
        1,
        "sliding_window",
        128,
    )
    assert ev.block_size == 8 and ev.lora_name == "sql" and ev.extra_keys == [("sql",), ("sql",)]
    assert isinstance(pool.reset()[0], AllBlocksCleared) and pool.num_cached == 0


@settings(max_examples=60)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(1, 20)), min_size=1, max_size=30))
def test_invariants_under_random_workload(ops: list[tuple[int, int]]) -> None:
    pool = BlockPool(12, KVGroupSpec(block_size=BS))
    held = []
    announced: set[bytes] = set()
    for i, (prefix, length) in enumerate(ops):
        prompt = [prefix] * 4 + list(range(length))
        d = digests(prompt)
        if pool.can_allocate(d, len(prompt), len(prompt)):
            alloc, events = pool.allocate(str(i), d, len(prompt), len(prompt), RequestExtras())
            for e in events:  # allocation only ever evicts, one block per event
                assert isinstance(e, BlockRemoved) and len(e.block_hashes) == 1
                assert e.block_hashes[0] in announced  # only announced blocks are removed
            for e in pool.cache_blocks(alloc, d, prompt, announce_from=0):
                assert isinstance(e, BlockStored)
                announced.update(h for h in e.block_hashes if isinstance(h, bytes))
            held.append(alloc)
        if len(held) > 2:
            pool.free(held.pop(0))
        in_use = {b.block_id for a in held for b in a.blocks}
        assert pool.num_free + len(in_use) == pool.num_blocks
        assert all(b.ref_cnt == sum(b in a.blocks for a in held) for a in held for b in a.blocks)
        # Every digest the pool holds was announced by a BlockStored.
        assert all(pool.is_cached(h) <= (h in announced) for h in announced | set(d))


def test_duplicate_physical_blocks_are_stored_and_removed_twice() -> None:
    pool = BlockPool(6, KVGroupSpec(block_size=BS))
    prompt = list(range(9))
    d = digests(prompt)
    a, _ = pool.allocate("a", d, 9, 9, RequestExtras())
    b, _ = pool.allocate("b", d, 9, 9, RequestExtras())  # before a's blocks were cached
    assert b.hit_blocks == 0
    ev_a = pool.cache_blocks(a, d, prompt)
    ev_b = pool.cache_blocks(b, d, prompt)
    assert ev_a[0].block_hashes == ev_b[0].block_hashes == d  # type: ignore[union-attr]
    pool.free(a)
    pool.free(b)
    _, evictions = pool.allocate("c", [], 24, 24, RequestExtras())  # needs all 6 blocks
    removed = [e.block_hashes[0] for e in evictions if isinstance(e, BlockRemoved)]
    assert sorted(removed) == sorted(d * 2)
    assert pool.num_cached == 0


def test_cpu_tier_lru_and_events() -> None:
    from kvtools.sim.block_pool import CpuTier

    spec = KVGroupSpec(block_size=BS)
    pool = BlockPool(2, spec, offload=CpuTier(1, spec))
    a, _ = run_request(pool, "a", list(range(8)))
    pool.free(a)
    _, ev = pool.allocate("b", [], 8, 8, RequestExtras())
    kinds = [(type(e).__name__, e.medium) for e in ev]  # type: ignore[union-attr]
    # Tail block evicted first and offloaded; then the head evicts it from the 1-block CPU tier.
    assert kinds == [
        ("BlockRemoved", "GPU"),
        ("BlockStored", "CPU"),
        ("BlockRemoved", "GPU"),
        ("BlockRemoved", "CPU"),
        ("BlockStored", "CPU"),
    ]
    head = ev[4]
    assert isinstance(head, BlockStored) and head.parent_block_hash is None
    assert head.token_ids == list(range(4)) and head.block_hashes == digests(list(range(8)))[:1]
    assert pool.cpu_hits(digests(list(range(8))), 0, 9) == 1
