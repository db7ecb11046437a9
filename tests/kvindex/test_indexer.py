"""kvindex.Indexer, the embedder's facade: vLLM batches in (as bytes, encoded by the test's own
vLLM double, or decoded), scores out, over the index make_index builds."""

from __future__ import annotations

from pathlib import Path

import fakeredis
import pytest
from prometheus_client import CollectorRegistry
from tokenizers import Tokenizer, models, pre_tokenizers

import kvindex
from kvindex import (
    BatchDecodeError,
    ConfigError,
    IndexConfig,
    Indexer,
    IndexerConfig,
    KVIndexError,
    ScoreRequestError,
    TierWeights,
)
from kvindex.index import LockedIndex, MemoryIndex
from kvindex.service.redis_backend import RedisBackend
from kvindex.service.score_api import ErrorKind
from tests.events import cleared, encode_batch, removed, stored

E1, E2 = "10.0.0.1:8000", "10.0.0.2:8000"
TOKENS = list(range(100, 164))  # 4 blocks of 16
# TOKENS and one more: every stored block of TOKENS reusable (vLLM recomputes the block of a
# prompt's last token, so TOKENS itself reuses 3).
QUERY = [*TOKENS, 200]


def test_ingest_bytes_and_score_token_ids() -> None:
    indexer = Indexer()
    assert isinstance(indexer.index, LockedIndex)
    counts = indexer.ingest(E1, encode_batch([stored([1, 2, 3, 4], None, TOKENS)]), "m")
    assert counts.stored_blocks == 4 and counts.events == {"BlockStored": 1}
    indexer.ingest(E2, encode_batch([stored([7, 8], None, TOKENS[:32])], "array"), "m")
    assert indexer.score("m", QUERY) == {E1: 1.0, E2: 0.5}  # best first
    assert indexer.score("m", QUERY, engines=[E2, "9.9.9.9:1"]) == {E2: 0.5, "9.9.9.9:1": 0.0}
    assert indexer.score("other-model", QUERY) == {}  # keys are rooted at the model
    indexer.ingest(E1, encode_batch([removed([2])]), "m")
    assert indexer.score("m", QUERY)[E1] == 0.25
    result = indexer.score_result("m", QUERY)
    assert result.total_blocks == 4 and result.scores[0].engine == E2
    assert indexer.engines() == [E1, E2]
    indexer.forget(E2)
    assert indexer.engines() == [E1]


def test_decoded_batches_default_model_and_tiers() -> None:
    config = IndexerConfig(default_model="m", weights=TierWeights(cpu=0.5))
    indexer = Indexer(config)
    batch = kvindex.decode_batch(encode_batch([stored([1, 2], None, TOKENS[:32], medium="CPU")]))
    indexer.ingest(E1, batch)  # model None: the default model
    assert indexer.score("m", QUERY[:33]) == {E1: 0.5}
    indexer.ingest(E1, encode_batch([cleared()]))
    assert indexer.score("m", QUERY[:33]) == {}


def test_undecodable_payload_raises() -> None:
    with pytest.raises(BatchDecodeError) as caught:
        Indexer().ingest(E1, b"\xc1 not msgpack", "m")
    assert isinstance(caught.value, KVIndexError) and isinstance(caught.value, ValueError)


def test_lora_and_salt_root_the_keys() -> None:
    indexer = Indexer()
    salted = stored([1, 2], None, TOKENS[:32], lora_name="sql", extra_keys=[["sql", "s"], None])
    indexer.ingest(E1, encode_batch([salted]), "m")
    assert indexer.score("m", QUERY[:33]) == {}
    assert indexer.score("m", QUERY[:33], lora="sql", cache_salt="s") == {E1: 1.0}


def _tokenizer(directory: Path) -> str:
    """A word-level tokenizer.json: word i of the vocabulary is token i."""
    words = ["[UNK]", *(f"w{i}" for i in range(64))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    path = directory / "tokenizer.json"
    tok.save(str(path))
    return str(path)


def test_text_prompts_go_through_the_models_tokenizer(tmp_path: Path) -> None:
    config = IndexerConfig(tokenizers={"m": _tokenizer(tmp_path)}, lora_adapters={"sql": "m"})
    indexer = Indexer(config)
    indexer.load_tokenizers()
    text = " ".join(f"w{i}" for i in range(40))  # ids 1..40: 2 full blocks
    indexer.ingest(E1, encode_batch([stored([1, 2], None, list(range(1, 33)))]), "m")
    assert indexer.score("m", text) == {E1: 1.0}
    with pytest.raises(ScoreRequestError) as caught:
        indexer.score("nope", text)
    assert caught.value.kind is ErrorKind.UNKNOWN_MODEL
    adapter = stored([5, 6], None, list(range(1, 33)), lora_name="sql")
    indexer.ingest(E2, encode_batch([adapter]), "m")
    assert indexer.score("sql", text) == {E2: 1.0}  # an adapter name resolves to its base


def test_text_without_a_tokenizer_is_refused() -> None:
    with pytest.raises(ScoreRequestError) as caught:
        Indexer().score("m", "hello")
    assert caught.value.kind is ErrorKind.NO_TOKENIZER
    with pytest.raises(ConfigError, match="lora_adapters"):
        Indexer(IndexerConfig(lora_adapters={"a": "m"}))


def test_speculative_picks() -> None:
    indexer = Indexer(IndexerConfig(speculative_ttl_s=60.0))
    assert indexer.record_pick(E1, "m", TOKENS) == 4
    assert indexer.score("m", QUERY) == {E1: 1.0}
    assert Indexer().record_pick(E1, "m", TOKENS) == 0  # disabled by default


def test_the_engines_events_settle_speculative_entries() -> None:
    indexer = Indexer(IndexerConfig(speculative_ttl_s=60.0))
    indexer.record_pick(E1, "m", TOKENS)
    # A stored block is real from then on: its removal is the truth, no twin stays behind
    # to claim it for the rest of its TTL.
    indexer.ingest(E1, encode_batch([stored([1, 2], None, TOKENS[:32])]), "m")
    assert indexer.score("m", QUERY) == {E1: 1.0}  # 2 real + 2 speculative
    indexer.ingest(E1, encode_batch([removed([1, 2])]), "m")
    assert indexer.score("m", QUERY) == {}
    # Blocks the engine has not stored yet keep their entries; a cleared cache drops them.
    indexer.record_pick(E2, "m", TOKENS)
    indexer.ingest(E2, encode_batch([stored([5], None, list(range(500, 516)))]), "m")
    assert indexer.score("m", QUERY) == {E2: 1.0}
    indexer.ingest(E2, encode_batch([cleared()]), "m")
    assert indexer.score("m", QUERY) == {}


def test_over_redis_and_metrics() -> None:
    registry = CollectorRegistry()
    client = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    config = IndexerConfig(index=IndexConfig(backend="redis", redis_prefix="kvitest-indexer"))
    indexer = Indexer(config, registry=registry, redis_client=client)
    assert isinstance(indexer.index.inner, RedisBackend)
    indexer.ingest(E1, encode_batch([stored([1, 2, 3, 4], None, TOKENS)]), "m")
    assert indexer.score("m", QUERY) == {E1: 1.0}
    assert registry.get_sample_value("kvindex_index_engines") == 1.0
    ok = {"api": "library", "method": "score", "outcome": "ok"}
    assert registry.get_sample_value("kvindex_score_requests_total", ok) == 1.0
    indexer.close()


def test_a_given_index_is_wrapped_like_the_factorys() -> None:
    backend = MemoryIndex()
    indexer = Indexer(index=backend)
    assert indexer.index.inner is backend
    indexer.ingest(E1, encode_batch([stored([1], None, TOKENS[:16])]), "m")
    assert backend.engines() == [E1]
