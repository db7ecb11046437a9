"""The precise scorer's kvindex backends over real sockets: the in-process index fed by a
vLLM-faithful publisher (bind mode and pod-discovery connect mode), and a kvindex sidecar
answering over real gRPC."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

from epp.framework import SchedulerDeps, build_scheduler, load_config
from epp.framework.config import ConfigError
from epp.plugins import default_registry
from epp.plugins.precise_prefix import PREFIX_BACKEND_FACTORY, PrecisePrefixParams
from epp.plugins.precise_profile import precise_profile_config
from epp.precise import InProcessIndex, RemoteIndex, build_backend
from epp.precise.options import backend_options
from epp.types import Endpoint, EngineMetrics, LLMRequest
from kvindex.index import MemoryIndex
from kvindex.ingest import EventApplier
from kvindex.scoring import Scorer
from kvindex.service.grpc_server import build_grpc_server
from kvindex.service.score_api import ScoreService
from kvindex.tokenize import load_tokenizer
from kvindex.wire import decode_batch
from kvtools.demo.model import write_model_dir
from kvtools.sim.events import BlockRemoved, block_stored, encode_batch
from kvtools.sim.publisher import EventPublisher
from tests.metrics import sample
from tests.ports import free_port

MODEL = "demo-model"
ENGINE = "10.1.2.3:8000"
TOKENS = list(range(1000, 1064))  # 4 blocks
# TOKENS and one more: all of TOKENS' blocks reusable (vLLM recomputes a prompt's last block).
QUERY = [*TOKENS, 7]


def params(**overrides: Any) -> PrecisePrefixParams:
    plugin: dict[str, Any] = {"type": "precise-prefix-cache-scorer", "parameters": overrides}
    doc = {
        "apiVersion": "llm-d.ai/v1alpha1",
        "kind": "EndpointPickerConfig",
        "plugins": [plugin],
        "schedulingProfiles": [
            {"name": "default", "plugins": [{"pluginRef": "precise-prefix-cache-scorer"}]}
        ],
    }
    config = load_config(yaml.safe_dump(doc), default_registry())
    spec = next(p for p in config.plugins if p.type_name == "precise-prefix-cache-scorer")
    assert isinstance(spec.parameters, PrecisePrefixParams)
    return spec.parameters


async def until(check: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met before the deadline")
        await asyncio.sleep(0.02)


def request(**kw: Any) -> LLMRequest:
    return LLMRequest(request_id="r", path="/v1/completions", model=MODEL, base_model=MODEL, **kw)


def test_options_errors_name_the_entry() -> None:
    with pytest.raises(ConfigError, match="remoteIndex needs an 'address'"):
        backend_options(params(indexerConfig={"remoteIndex": {}}))
    with pytest.raises(ConfigError, match=r"kvEventsConfig: unknown parameters \['bogus'\]"):
        backend_options(params(kvEventsConfig={"bogus": 1}))
    with pytest.raises(ConfigError, match="tokenizers must map"):
        backend_options(params(tokenProcessorConfig={"tokenizers": ["x"]}))
    options = backend_options(
        params(indexerConfig={"kvBlockIndexConfig": {"redisConfig": {"address": "redis://r:1"}}})
    )
    assert options.redis_address == "redis://r:1"
    remote = build_backend(params(indexerConfig={"remoteIndex": {"address": "h:1"}}))
    assert isinstance(remote, RemoteIndex) and remote.timeout_s == 0.05


async def _publish_until_scored(
    backend: InProcessIndex, publisher: EventPublisher, engine: str
) -> None:
    stored = block_stored([11, 12, 13, 14], TOKENS, 16)

    async def scored() -> bool:
        publisher.publish([stored])  # re-announcements are idempotent (slow-joiner safe)
        publisher.flush()
        got = await backend.score(request(token_ids=QUERY), [engine])
        return got.get(engine, 0.0) == 1.0

    await until(scored)


# An engine publishing from this machine: on a bind socket its topic must name the address it
# publishes from (strict admission checks the peer address).
LOCAL = "127.0.0.1:8000"


def knowing(*keys: str) -> Callable[[Callable[[Sequence[Endpoint]], None]], None]:
    """subscribe_endpoints as the picker passes it: the endpoints it routes to."""

    def subscribe(callback: Callable[[Sequence[Endpoint]], None]) -> None:
        callback([Endpoint(k.rsplit(":", 1)[0], int(k.rsplit(":", 1)[1])) for k in keys])

    return subscribe


async def test_in_process_bind_mode_scores_from_live_events() -> None:
    port = free_port()
    backend = build_backend(
        params(kvEventsConfig={"zmqEndpoint": f"tcp://127.0.0.1:{port}"}),
        subscribe_endpoints=knowing(LOCAL),
    )
    assert isinstance(backend, InProcessIndex)
    await backend.start()
    publisher = EventPublisher(f"tcp://127.0.0.1:{port}", topic=f"kv@{LOCAL}@{MODEL}")
    try:
        await _publish_until_scored(backend, publisher, LOCAL)
        # Half the prompt matches after a removal of the third block.
        publisher.publish([BlockRemoved(block_hashes=[13], medium="GPU")])
        publisher.flush()

        async def halved() -> bool:
            got = await backend.score(request(token_ids=QUERY), [LOCAL, "9.9.9.9:1"])
            return got == {LOCAL: 0.5, "9.9.9.9:1": 0.0}

        await until(halved)
        # The engine's GPU blocks per its stream: 4 stored (announced again while waiting
        # for the subscription: counted once), 1 removed; an engine never heard from: absent.
        assert backend.resident_blocks([LOCAL, "9.9.9.9:1"]) == {LOCAL: 3}
        # Another model's request never matches these blocks.
        other = LLMRequest(request_id="o", path="/", model="m2", base_model="m2", token_ids=TOKENS)
        assert (await backend.score(other, [LOCAL])).get(LOCAL, 0.0) == 0.0
    finally:
        publisher.close()
        await backend.stop()


@pytest.mark.parametrize("accept_any", [False, True])
async def test_in_process_bind_mode_accepts_only_the_pickers_endpoints(accept_any: bool) -> None:
    # Strict by default: on the bind socket, a topic naming no endpoint of the picker is
    # dropped and counted; kvEventsConfig.acceptAnyEngine accepts it.
    port = free_port()
    kv: dict[str, Any] = {"zmqEndpoint": f"tcp://127.0.0.1:{port}"}
    if accept_any:
        kv["acceptAnyEngine"] = True
    backend = build_backend(params(kvEventsConfig=kv), subscribe_endpoints=knowing(LOCAL))
    assert isinstance(backend, InProcessIndex)
    await backend.start()
    stranger = EventPublisher(f"tcp://127.0.0.1:{port}", topic=f"kv@10.66.0.1:8000@{MODEL}")
    known = EventPublisher(f"tcp://127.0.0.1:{port}", topic=f"kv@{LOCAL}@{MODEL}")
    try:
        await _publish_until_scored(backend, known, LOCAL)

        def refused() -> float:
            return sample(
                backend.ingest.metrics,
                "kvindex_ingest_refused_batches_total",
                reason="unknown_engine",
            )

        if accept_any:
            await _publish_until_scored(backend, stranger, "10.66.0.1:8000")
            assert refused() == 0
        else:

            async def counted() -> bool:
                stranger.publish([block_stored([21, 22, 23, 24], TOKENS, 16)])
                stranger.flush()
                return refused() > 0

            await until(counted)
            got = await backend.score(request(token_ids=QUERY), ["10.66.0.1:8000"])
            assert got.get("10.66.0.1:8000", 0.0) == 0.0
    finally:
        stranger.close()
        known.close()
        await backend.stop()


async def test_in_process_discovers_pods_and_connects() -> None:
    publisher = EventPublisher("tcp://127.0.0.1:*", topic=f"kv@127.0.0.1:8000@{MODEL}")
    port = int(publisher.bound_endpoint.rsplit(":", 1)[1])
    listeners: list[Callable[[Sequence[Endpoint]], None]] = []
    backend = build_backend(
        params(kvEventsConfig={"discoverPods": True, "podDiscoveryConfig": {"socketPort": port}}),
        subscribe_endpoints=listeners.append,
    )
    assert isinstance(backend, InProcessIndex)
    await backend.start()
    try:
        assert len(listeners) == 1
        listeners[0]([Endpoint(address="127.0.0.1", port=8000)])
        await _publish_until_scored(backend, publisher, "127.0.0.1:8000")
    finally:
        publisher.close()
        await backend.stop()


async def test_in_process_tokenizes_chat_and_records_speculative(tmp_path: Path) -> None:
    model_dir = write_model_dir(tmp_path / "model")
    port = free_port()
    backend = build_backend(
        params(
            tokenProcessorConfig={"tokenizers": {MODEL: str(model_dir)}},
            kvEventsConfig={"zmqEndpoint": f"tcp://127.0.0.1:{port}"},
            speculativeIndexing=True,
        ),
        subscribe_endpoints=knowing(ENGINE),
    )
    await backend.start()
    try:
        messages = [{"role": "system", "content": "word " * 200}, {"role": "user", "content": "hi"}]
        chat = request(messages=messages)
        assert await backend.score(chat, [ENGINE]) == {ENGINE: 0.0}
        expected = load_tokenizer(model_dir).apply_chat_template(messages)
        assert chat.token_ids == expected  # tokenized once, reused by later plugins
        backend.record_pick(chat, ENGINE)
        again = request(messages=messages)
        got = await backend.score(again, [ENGINE])
        assert got[ENGINE] > 0.9  # speculative entries until the engine's events arrive
        # ... which settle them (stored blocks, cleared caches): the same entries.
        assert backend.ingest.applier.speculative is backend.indexer.scorer.speculative
        unknown = LLMRequest(request_id="u", path="/", model="nope", base_model="nope", prompt="x")
        assert await backend.score(unknown, [ENGINE]) == {}  # counted, not raised
    finally:
        await backend.stop()


async def test_remote_index_over_grpc() -> None:
    index = MemoryIndex()
    stored = block_stored([1, 2, 3, 4], TOKENS, 16)
    EventApplier(index).apply_batch(ENGINE, decode_batch(encode_batch(0.0, [stored], 0)), MODEL)
    server = build_grpc_server(ScoreService(Scorer(index)))
    port = server.add_insecure_port("127.0.0.1:0")
    remote = {"remoteIndex": {"address": f"127.0.0.1:{port}", "timeoutMs": 2000}}
    backend = build_backend(params(indexerConfig=remote))
    await server.start()
    assert isinstance(backend, RemoteIndex)
    await backend.start()
    try:
        got = await backend.score(request(token_ids=QUERY[:33]), [ENGINE, "1.1.1.1:1"])
        assert got == {ENGINE: 1.0, "1.1.1.1:1": 0.0}
        # The sidecar has no tokenizer: a text prompt fails there, is counted, scores nothing.
        assert await backend.score(request(prompt="hello"), [ENGINE]) == {}
        assert backend.failures.labels("ScorePrompt", "FAILED_PRECONDITION")._value.get() == 1
    finally:
        await backend.stop()
        await server.stop(None)


async def test_remote_index_down_scores_nothing() -> None:
    port = free_port()
    backend = build_backend(
        params(indexerConfig={"remoteIndex": {"address": f"127.0.0.1:{port}", "timeoutMs": 200}})
    )
    assert isinstance(backend, RemoteIndex)
    await backend.start()
    try:
        assert await backend.score(request(token_ids=QUERY), [ENGINE]) == {}
        codes = {s.labels["code"] for m in backend.failures.collect() for s in m.samples}
        assert codes & {"UNAVAILABLE", "DEADLINE_EXCEEDED"}
    finally:
        await backend.stop()


def test_remote_index_token_file(tmp_path: Path) -> None:
    # The sidecar's --api-token-file: the picker sends it with RecordSpeculative.
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    remote = {"address": "h:1", "tokenFile": str(token)}
    assert backend_options(params(indexerConfig={"remoteIndex": remote})).remote_token == "s3cret"
    missing = {"address": "h:1", "tokenFile": str(tmp_path / "missing")}
    with pytest.raises(ConfigError, match="tokenFile"):
        backend_options(params(indexerConfig={"remoteIndex": missing}))


def test_in_process_curve_settings(tmp_path: Path) -> None:
    # kvEventsConfig.curve: the in-process index's event sockets over ZMQ CURVE (ours).
    import zmq.auth

    _, secret = zmq.auth.create_certificates(tmp_path, "index")
    backend = build_backend(
        params(kvEventsConfig={"zmqEndpoint": "tcp://127.0.0.1:*", "curve": {"certFile": secret}})
    )
    assert isinstance(backend, InProcessIndex)
    curve = backend.ingest.config.curve
    assert curve is not None and curve.allowed_clients is None
    with pytest.raises(ConfigError, match=r"kvEventsConfig\.curve: --zmq-curve-cert"):
        build_backend(params(kvEventsConfig={"curve": {"certFile": str(tmp_path / "nope")}}))


async def test_in_process_index_started_after_the_engine_replays_it() -> None:
    # A picker (re)started after the engine published: with kvEventsConfig.replayPort the
    # first batch it sees (seq > 0) makes it ask the engine's replay socket for everything
    # from seq 0, so blocks cached before the start are known.
    port, replay_port = free_port(), free_port()
    engine = EventPublisher(
        f"tcp://127.0.0.1:{port}", f"tcp://127.0.0.1:{replay_port}", topic=f"kv@{LOCAL}@{MODEL}"
    )
    try:
        engine.publish([block_stored([11, 12], TOKENS[:32], 16)])  # nobody listens yet
        engine.flush()
        backend = build_backend(
            params(
                kvEventsConfig={"zmqEndpoint": f"tcp://127.0.0.1:{port}", "replayPort": replay_port}
            ),
            subscribe_endpoints=knowing(LOCAL),
        )
        assert isinstance(backend, InProcessIndex)
        await backend.start()
        try:

            async def whole_prompt() -> bool:
                engine.publish([block_stored([13, 14], TOKENS[32:], 16, parent_block_hash=12)])
                engine.flush()
                got = await backend.score(request(token_ids=QUERY), [LOCAL])
                return got.get(LOCAL, 0.0) == 1.0

            await until(whole_prompt)
            assert (
                sample(
                    backend.ingest.metrics,
                    "kvindex_ingest_replays_total",
                    reason="first_contact",
                    outcome="succeeded",
                )
                == 1
            )
        finally:
            await backend.stop()
    finally:
        engine.close()


async def test_a_burst_is_scheduled_in_order_each_seeing_the_picks_before_it(
    tmp_path: Path,
) -> None:
    """Eight requests for one prompt at once, before any engine has published: the first
    pick's speculative entries make the next seven follow it. The producers of a request run
    in its own task (not wait_for's new one), so concurrent requests do not all look the
    index up before the first of them is placed."""
    model_dir = write_model_dir(tmp_path / "model")
    doc = precise_profile_config(
        tokenizers={MODEL: str(model_dir)}, events_endpoint=f"tcp://127.0.0.1:{free_port()}"
    )
    scheduler = build_scheduler(
        load_config(yaml.safe_dump(doc), default_registry()),
        SchedulerDeps(extras={PREFIX_BACKEND_FACTORY: build_backend}),
    )
    await scheduler.start()
    try:
        now = time.monotonic()
        pool = [
            Endpoint(f"10.0.0.{i}", 8000, metrics=EngineMetrics(updated_at=now)) for i in range(4)
        ]
        burst = [
            LLMRequest(
                request_id=f"r{i}",
                path="/v1/completions",
                model=MODEL,
                base_model=MODEL,
                token_ids=list(QUERY),
            )
            for i in range(8)
        ]
        results = await asyncio.gather(*(scheduler.schedule(r, list(pool)) for r in burst))
        assert len({r.endpoints[0].key for r in results}) == 1
    finally:
        await scheduler.stop()
