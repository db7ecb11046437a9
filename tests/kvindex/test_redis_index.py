"""Redis index specifics beyond the shared behaviour suite: replicas sharing one Redis, the
key schema, TTLs, evicted keys, epochs, fencing, wide engine bitmaps and URL forms. Real
Redis (the shared 127.0.0.1:6379 under a fresh prefix, or private servers) unless a test
says fakeredis."""

from __future__ import annotations

import random
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import fakeredis
import pytest
import redis
from hypothesis import given, settings
from hypothesis import strategies as st
from redis.crc import key_slot
from redis_servers import RedisServerProcess

from kvindex.index import (
    BlockIndex,
    Clear,
    MemoryIndex,
    PrefixMatch,
    Remove,
    Store,
    StoredBlock,
    redis_scripts,
)
from kvindex.index import Tier as T
from kvindex.index.redis import (
    IndexUnavailable,
    NotWriter,
    RedisIndex,
    RedisIndexConfig,
    redis_client_from_url,
)
from kvindex.index.redis_lease import redis_writer_lease
from kvindex.index.redis_schema import RedisKeySchema
from tests.ports import free_port


def chain(base: int, n: int) -> list[int]:
    return [base + i for i in range(n)]


def store(tier: T, hashes_keys: list[tuple[int, int]]) -> Store:
    return Store(tier, [StoredBlock(h, (k,)) for h, k in hashes_keys])


@pytest.fixture
def replicas(redis_url: str, redis_prefix: str) -> Iterator[tuple[RedisIndex, RedisIndex]]:
    a = RedisIndex.from_url(redis_url, prefix=redis_prefix)
    b = RedisIndex.from_url(redis_url, prefix=redis_prefix)  # its own connection pool
    yield a, b
    a.close()
    b.close()


def test_two_replicas_see_one_state(replicas: tuple[RedisIndex, RedisIndex]) -> None:
    a, b = replicas
    keys = chain(10_000, 40)
    a.apply("e1:80", [store(T.GPU, [(i, k) for i, k in enumerate(keys)])])
    a.apply("e2:80", [store(T.CPU, [(100 + i, k) for i, k in enumerate(keys[:10])])])
    # b never wrote anything: it scores from Redis alone, as a replica started later does.
    expected = {"e1:80": PrefixMatch(40, [40, 0, 0]), "e2:80": PrefixMatch(10, [0, 10, 0])}
    assert a.lookup(keys) == b.lookup(keys) == expected
    assert b.resolve("e1:80", 5) == keys[5] and b.engines() == ["e1:80", "e2:80"]
    b.apply("e1:80", [Remove(T.GPU, [20])])
    assert a.lookup(keys)["e1:80"].blocks == 20
    assert a.generation() == b.generation() is not None


def test_replicas_writing_the_same_stream_do_not_double_count(
    replicas: tuple[RedisIndex, RedisIndex],
) -> None:
    """Every replica applying every batch (the all-writers model) ends where one does."""
    a, b = replicas
    reference = MemoryIndex()
    rng = random.Random(7)
    batches: list[tuple[str, list[Store | Remove | Clear]]] = []
    for _ in range(60):
        engine = rng.choice(["x:1", "y:1", "z:1"])
        tier = rng.choice(list(T))
        hashes = rng.sample(range(30), 4)
        if rng.random() < 0.7:
            batches.append((engine, [store(tier, [(h, 500 + h // 2) for h in hashes])]))
        else:
            batches.append((engine, [Remove(tier, hashes)]))
    for engine, ops in batches:
        reference.apply(engine, ops)
        a.apply(engine, ops)
        b.apply(engine, ops)
    probe = chain(500, 15)
    assert a.lookup(probe) == reference.lookup(probe)
    assert a.stats().entries == reference.stats().entries
    assert a.stats().keys == reference.stats().keys


@pytest.mark.parametrize("backend", ["redis", "fakeredis"])
def test_many_engines_match_memory(backend: str, redis_url: str, redis_prefix: str) -> None:
    """70 engines: bitmaps wider than one byte, candidate filters, all three tiers."""
    client: redis.Redis = (
        redis.Redis.from_url(redis_url)
        if backend == "redis"
        else fakeredis.FakeRedis(server=fakeredis.FakeServer())
    )
    index = RedisIndex(client, RedisIndexConfig(prefix=redis_prefix))
    reference = MemoryIndex()
    rng = random.Random(11)
    prompt = chain(1 << 62, 64)
    engines = [f"10.0.0.{i}:8000" for i in range(70)]
    for n, engine in enumerate(engines):
        length = rng.randrange(0, 64)
        tier = T(n % 3)
        ops: list[Store | Remove | Clear] = [
            store(tier, [((n << 8) + i, k) for i, k in enumerate(prompt[:length])])
        ]
        if length > 4 and n % 5 == 0:
            ops.append(store(T.GPU, [((n << 8) + 1, prompt[1])]))
            ops.append(Remove(tier, [(n << 8) + length // 2]))
        index.apply(engine, ops)
        reference.apply(engine, ops)
    index.purge(engines[3])
    reference.purge(engines[3])
    assert index.lookup(prompt) == reference.lookup(prompt)
    subset = [*engines[::7], "unknown:1"]
    assert index.lookup(prompt, subset) == reference.lookup(prompt, subset)
    assert index.engines() == reference.engines()
    client.close()


def test_wide_keys_and_bytes_engine_hashes(fakeredis_index: RedisIndex) -> None:
    big = (1 << 64) - 1  # Lua would round this as a number: it must stay a string
    fakeredis_index.apply("e:1", [Store(T.GPU, [StoredBlock(b"\x00\xffhash", (big - 1, big))])])
    assert fakeredis_index.resolve("e:1", b"\x00\xffhash") == big
    assert fakeredis_index.resolve("e:1", 0) is None
    assert fakeredis_index.lookup([big - 1, big]) == {"e:1": PrefixMatch(2, [2, 0, 0])}


@pytest.fixture
def fakeredis_index() -> Iterator[RedisIndex]:
    client = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    yield RedisIndex(client, RedisIndexConfig(prefix="fake"))
    client.close()


def test_every_key_is_in_the_index_hash_slot(redis_url: str, redis_prefix: str) -> None:
    index = RedisIndex.from_url(redis_url, prefix=redis_prefix)
    index.apply("e:1", [store(T.GPU, [(1, 11), (2, 12)]), store(T.STORAGE, [(3, 13)])])
    redis_writer_lease(index).try_acquire()
    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(match="{" + redis_prefix + "}:*"))
    assert len(keys) >= 8  # epoch, registry (3), holders (3), maps (2), lease
    assert {key_slot(k) for k in keys} == {index.schema.hash_slot()}
    client.close()
    index.close()


def test_schema_rejects_prefixes_that_break_the_tag() -> None:
    for bad in ("", "a}b", "x{", "a:b", "a*", "a b"):
        with pytest.raises(ValueError, match="prefix"):
            RedisKeySchema(bad)
    # Different prefixes may land in different slots, so indexes spread across shards.
    slots = {RedisKeySchema(f"model-{i}").hash_slot() for i in range(20)}
    assert len(slots) > 10


def test_holders_expire_maps_and_registry_do_not(redis_url: str, redis_prefix: str) -> None:
    index = RedisIndex.from_url(redis_url, prefix=redis_prefix, ttl_seconds=600)
    index.apply("e:1", [store(T.GPU, [(1, 11)])])
    client = redis.Redis.from_url(redis_url)
    schema = index.schema
    assert 0 < client.ttl(schema.holders(T.GPU, 11)) <= 600
    for key in (schema.engine_map(0, T.GPU), schema.engine_slots, schema.epoch):
        assert client.ttl(key) == -1  # never expire: losing them would mis-resolve removes
    client.close()
    index.close()


def test_evicted_holder_key_is_safe(redis_url: str, redis_prefix: str) -> None:
    """A holder bitmap evicted (or expired) while the engine map survives under-reports,
    and a later remove must not resurrect it as an empty key."""
    index = RedisIndex.from_url(redis_url, prefix=redis_prefix)
    index.apply("e:1", [store(T.GPU, [(1, 11), (2, 12), (3, 13)])])
    client = redis.Redis.from_url(redis_url)
    client.delete(index.schema.holders(T.GPU, 12))  # what maxmemory / TTL would do
    assert index.lookup([11, 12, 13]) == {"e:1": PrefixMatch(1, [1, 0, 0])}
    index.apply("e:1", [Remove(T.GPU, [2])])
    assert not client.exists(index.schema.holders(T.GPU, 12))
    index.apply("e:1", [store(T.GPU, [(2, 12)])])  # the engine re-stores it
    assert index.lookup([11, 12, 13])["e:1"].blocks == 3
    client.close()
    index.close()


def test_data_loss_changes_the_epoch_on_every_replica(
    replicas: tuple[RedisIndex, RedisIndex], redis_url: str, redis_prefix: str
) -> None:
    a, b = replicas
    seen: list[tuple[str | None, str]] = []
    a.on_reset(lambda old, new: seen.append((old, new)))
    a.apply("e:1", [store(T.GPU, [(1, 11)])])
    assert b.lookup([11])
    before = a.generation()
    client = redis.Redis.from_url(redis_url)
    client.delete(*client.scan_iter(match="{" + redis_prefix + "}:*"))  # as a restart would
    client.close()
    assert a.lookup([11]) == {}
    assert seen and seen[0][0] == before and a.generation() == seen[0][1] != before
    assert b.lookup([11]) == {} and b.generation() == a.generation()  # b installs nothing new
    assert a.health().resets == 1 and b.health().resets == 1
    a.apply("e:1", [store(T.GPU, [(1, 11)])])  # replayed
    assert b.lookup([11]) == {"e:1": PrefixMatch(1, [1, 0, 0])}


def test_fencing_refuses_writes_without_the_lease(replicas: tuple[RedisIndex, RedisIndex]) -> None:
    a, b = replicas
    lease_a = redis_writer_lease(a, owner="replica-a", ttl_s=30)
    lease_b = redis_writer_lease(b, owner="replica-b", ttl_s=30)
    a.set_fencing_owner(lease_a.owner)
    b.set_fencing_owner(lease_b.owner)
    with pytest.raises(NotWriter):  # nobody holds the lease yet
        a.apply("e:1", [store(T.GPU, [(1, 11)])])
    assert lease_a.try_acquire() and not lease_b.try_acquire()
    a.apply("e:1", [store(T.GPU, [(1, 11)])])
    with pytest.raises(IndexUnavailable):  # NotWriter is an IndexUnavailable
        b.apply("e:1", [Clear()])
    assert b.lookup([11]) == {"e:1": PrefixMatch(1, [1, 0, 0])}
    assert b.health().ok and b.health().failed_applies == 1


def test_url_forms_acl_user_db_and_unix_socket(tmp_path: Path) -> None:
    socket_path = tmp_path / "redis.sock"
    server = RedisServerProcess()
    server.extra_args = ["--unixsocket", str(socket_path), "--unixsocketperm", "700"]
    server.start()
    try:
        admin = redis.Redis(port=server.port)
        admin.acl_setuser(
            "router", enabled=True, passwords=["+s3cret"], keys=["*"], categories=["+@all"]
        )
        good = RedisIndex.from_url(f"redis://router:s3cret@127.0.0.1:{server.port}/3")
        good.apply("e:1", [store(T.GPU, [(1, 11)])])
        assert good.lookup([11])
        assert redis.Redis(port=server.port, db=3).exists(good.schema.epoch)
        assert not admin.exists(good.schema.epoch)  # db 0 untouched
        over_socket = RedisIndex.from_url(f"unix://{socket_path}?db=3")
        assert over_socket.lookup([11]) == {"e:1": PrefixMatch(1, [1, 0, 0])}
        wrong = RedisIndex.from_url(f"redis://router:nope@127.0.0.1:{server.port}/3")
        with pytest.raises(IndexUnavailable, match=r"Authentication|WRONGPASS|invalid"):
            wrong.apply("e:1", [Clear()])
        assert wrong.lookup([11]) == {} and not wrong.health().ok
    finally:
        server.stop()


def test_tls_and_cluster_urls_pick_the_right_client() -> None:
    tls = redis_client_from_url(f"rediss://:pw@127.0.0.1:{free_port()}/2")
    assert isinstance(tls, redis.Redis)
    kwargs = tls.connection_pool.connection_kwargs
    assert tls.connection_pool.connection_class is redis.SSLConnection
    assert kwargs["db"] == 2 and kwargs["password"] == "pw"
    bare = redis_client_from_url("redis-master:6380")  # llm-d's redisAddr form
    assert isinstance(bare, redis.Redis)
    assert bare.connection_pool.connection_kwargs["host"] == "redis-master"
    assert bare.connection_pool.connection_kwargs["port"] == 6380
    with pytest.raises(ValueError, match="unix"):
        redis_client_from_url("unix:///tmp/x.sock", cluster=True)


def test_redis_cli_can_read_the_schema(redis_url: str, redis_prefix: str) -> None:
    """The schema is plain Redis types an operator can inspect."""
    if shutil.which("redis-cli") is None:
        pytest.skip("redis-cli is not installed")
    index = RedisIndex.from_url(redis_url, prefix=redis_prefix)
    index.apply("10.1.2.3:8000", [store(T.GPU, [(7, 77)])])
    port = redis_url.rsplit(":", 1)[1].split("/")[0]
    out = subprocess.run(
        ["redis-cli", "-p", port, "HGETALL", index.schema.engine_slots],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert out == ["10.1.2.3:8000", "0"]
    index.close()


def test_index_is_a_block_index() -> None:
    def takes(index: BlockIndex) -> BlockIndex:
        return index

    client = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    assert takes(RedisIndex(client)).lookup([1]) == {}


# -- wide bitmaps against the reference backend, and atomicity under racing writers ---------

WIDE_ENGINES = [f"e{i}:1" for i in range(20)]  # 3 bitmap bytes (the suite uses 3 engines)
_wide_op = st.tuples(
    st.sampled_from(["store", "store", "remove", "clear", "purge"]),
    st.sampled_from(WIDE_ENGINES),
    st.sampled_from(list(T)),
    st.lists(st.integers(0, 15), min_size=1, max_size=6),
)


@settings(max_examples=60, deadline=None)
@given(
    ops=st.lists(_wide_op, max_size=60),
    probe=st.lists(st.integers(0, 7), min_size=1, max_size=8),
    candidates=st.none() | st.lists(st.sampled_from(WIDE_ENGINES), max_size=5),
)
def test_wide_bitmaps_match_memory(
    ops: list[tuple[str, str, T, list[int]]], probe: list[int], candidates: list[str] | None
) -> None:
    client = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    index, reference = RedisIndex(client), MemoryIndex()
    for kind, engine, tier, hashes in ops:
        if kind == "purge":
            index.purge(engine)
            reference.purge(engine)
            continue
        batch: list[Store | Remove | Clear]
        if kind == "store":  # two-key engine blocks: hash h covers keys h and h + 1
            batch = [Store(tier, [StoredBlock(h, (h // 2, h // 2 + 1)) for h in hashes])]
        elif kind == "remove":
            batch = [Remove(tier, hashes)]
        else:
            batch = [Clear(tier if hashes[0] % 2 else None)]
        index.apply(engine, batch)
        reference.apply(engine, batch)
    assert index.lookup(probe, candidates) == reference.lookup(probe, candidates)
    assert index.engines() == reference.engines()
    for engine in WIDE_ENGINES[:4]:
        for h in range(16):
            assert index.resolve(engine, h) == reference.resolve(engine, h)
    stats, expected = index.stats(), reference.stats()
    assert (stats.keys, stats.entries, stats.engines) == (
        expected.keys,
        expected.entries,
        expected.engines,
    )
    client.close()


def consistent(client: redis.Redis, index: RedisIndex, slot: int) -> bool:
    """The engine map and the holder bits of one engine slot say the same thing."""
    for tier in T:
        values = client.hvals(index.schema.engine_map(slot, tier))
        texts = [v.decode() if isinstance(v, bytes) else v for v in values]
        mapped = {int(k) for text in texts for k in text.split(",")}
        pattern = f"{index.schema.base}h:{int(tier)}:*"
        bits = {
            int(key.decode().rsplit(":", 1)[1])
            for key in client.scan_iter(match=pattern)
            if client.getbit(key, slot)
        }
        if mapped != bits:
            return False
    return True


def test_racing_replicas_never_tear_a_batch(
    replicas: tuple[RedisIndex, RedisIndex], redis_url: str
) -> None:
    """Two replicas hammer one engine, one storing, one removing and clearing: every script
    is atomic, so the map and the bits always agree and lookups see whole batches."""
    a, b = replicas
    keys = chain(70_000, 8)
    full = [store(T.GPU, [(h, k) for h, k in enumerate(keys)])]
    a.apply("e:1", full)
    errors: list[BaseException] = []

    def hammer(index: RedisIndex, batches: list[list[Store | Remove | Clear]]) -> None:
        try:
            for _ in range(150):
                for ops in batches:
                    index.apply("e:1", ops)
                    assert index.lookup(keys).get("e:1", PrefixMatch(0)).blocks in (0, 4, 8)
        except BaseException as exc:  # re-raised in the main thread
            errors.append(exc)

    threads = [
        threading.Thread(target=hammer, args=(a, [full])),
        threading.Thread(target=hammer, args=(b, [[Remove(T.GPU, [4, 5, 6, 7])], [Clear()]])),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors[0]
    client = redis.Redis.from_url(redis_url)
    assert consistent(client, a, 0)
    client.close()


class HeldReplies:
    """A fakeredis client whose script calls can be held after Redis answered (a slow
    thread), to replay replies out of order."""

    def __init__(self) -> None:
        self.client = fakeredis.FakeRedis(server=fakeredis.FakeServer())
        self.hold = threading.Event()
        self.answered = threading.Event()
        self.release = threading.Event()

    def register_script(self, source: str) -> object:
        script = self.client.register_script(source)

        def call(**kwargs: object) -> object:
            reply = script(**kwargs)
            if self.hold.is_set() and threading.current_thread().name == "slow":
                self.answered.set()
                self.release.wait(10)
            return reply

        return call


def test_late_reply_from_before_a_reset_is_not_a_second_reset() -> None:
    held = HeldReplies()
    index = RedisIndex(held.client)
    index._scripts = {  # route the scripts through the holding wrapper
        name: held.register_script(getattr(redis_scripts, name))  # type: ignore[misc]
        for name in ("APPLY", "RESOLVE", "ENGINES", "LOOKUP", "PING")
    }
    resets: list[tuple[str | None, str]] = []
    index.on_reset(lambda old, new: resets.append((old, new)))
    index.on_reset(lambda old, new: 1 / 0)  # a failing subscriber callback is contained
    index.apply("e:1", [store(T.GPU, [(1, 11)])])
    first = index.generation()
    held.hold.set()
    slow = threading.Thread(target=index.lookup, args=([11],), name="slow")
    slow.start()
    assert held.answered.wait(10)  # its reply carries the old epoch
    held.client.flushall()  # data lost
    assert index.lookup([11]) == {}  # noticed: one reset
    held.release.set()
    slow.join()
    assert resets == [(first, index.generation())] and index.health().resets == 1


def test_tls_url_against_a_tls_server(tmp_path: Path) -> None:
    """rediss:// to a private redis-server listening on TLS only (self-signed cert made
    here with openssl)."""
    if shutil.which("openssl") is None or shutil.which("redis-server") is None:
        pytest.skip("openssl / redis-server not installed")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
         "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    port = free_port()
    proc = subprocess.Popen(
        ["redis-server", "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
         "--tls-cert-file", str(cert), "--tls-key-file", str(key), "--tls-ca-cert-file",
         str(cert), "--tls-auth-clients", "no", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        index = RedisIndex.from_url(f"rediss://127.0.0.1:{port}/0", ssl_ca_certs=str(cert))
        deadline = time.monotonic() + 10
        while not index.health().ok:
            assert time.monotonic() < deadline, index.health()
            time.sleep(0.02)
        index.apply("e:1", [store(T.GPU, [(1, 11)])])
        assert index.lookup([11]) == {"e:1": PrefixMatch(1, [1, 0, 0])}
        plain = RedisIndex.from_url(f"redis://127.0.0.1:{port}/0", socket_timeout=0.3)
        assert plain.lookup([11]) == {} and not plain.health().ok
    finally:
        proc.kill()
        proc.wait(timeout=10)
