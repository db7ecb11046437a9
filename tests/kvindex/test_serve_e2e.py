"""`kvindex serve` end to end, as a real subprocess: a memory backend, the DeepSeek tokenizer
in a model directory with a chat template, engines simulated by `kvtools.sim` publishers
(real ZMQ PUB + ROUTER replay), scores over real HTTP and real gRPC, the doctor report, bad
input refused and counted."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from serve_process import KVINDEX, ServeProcess, http, wait_for

from kvindex._proto.indexer.v1 import indexer_pb2, indexer_pb2_grpc
from kvindex._proto.kvindex.v1 import kvindex_pb2, kvindex_pb2_grpc
from kvindex.tokenize import Tokenizer, load_tokenizer
from kvtools.demo.model import write_model_dir
from kvtools.sim.engine import EngineConfig
from kvtools.sim.http import KVEventsOptions, ServerConfig, SimServer
from kvtools.sim.publisher import EventPublisher
from kvtools.sim.tokenizer import load_tokenizer as load_sim_tokenizer
from tests.events import encode_batch, frame, sim_stored, stored
from tests.ports import free_port

MODEL = "demo-model"
ADAPTER = "demo-lora"
ENGINE_A = "127.0.0.1:8001"
ENGINE_B = "127.0.0.1:8002"
SILENT = "127.0.0.1:8009"  # in the engines file, never publishes
NO_PORT = "127.0.0.9"  # publishes with a topic that names no port (no discovered engine on it)
BS = 16
PROMPT = "The quick brown fox jumps over the lazy dog. " * 12
MESSAGES = [
    {"role": "system", "content": "You are a terse assistant that answers in one line."},
    {"role": "user", "content": "Explain KV-cache aware routing for LLM serving. " * 6},
]


@dataclass
class Cluster:
    server: ServeProcess
    a: EventPublisher
    b: EventPublisher
    no_port: EventPublisher
    tokenizer: Tokenizer
    model_dir: Path
    sub_endpoint: str  # the service's bound SUB socket (engines in connect mode)

    def publish_until(self, pub: EventPublisher, events: list[Any], body: dict[str, Any]) -> None:
        """Publish (idempotent stores) until /v1/score shows them: PUB/SUB joins late."""
        engine = ENGINE_A if pub is self.a else ENGINE_B
        want = len(self.ids(body)) // BS

        def landed() -> bool:
            pub.publish(events)
            return self.server.score(body).get(engine) == want

        wait_for(landed, what=f"{engine} blocks indexed")

    def ids(self, body: dict[str, Any]) -> list[int]:
        if "token_ids" in body:
            return list(body["token_ids"])
        if "prompt" in body:
            return self.tokenizer.encode(body["prompt"])
        return self.tokenizer.apply_chat_template(body["messages"])


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    model_dir = write_model_dir(tmp_path_factory.mktemp("model") / MODEL)
    a = EventPublisher("tcp://127.0.0.1:*", "tcp://127.0.0.1:*", topic=f"kv@{ENGINE_A}@{MODEL}")
    b = EventPublisher("tcp://127.0.0.1:*", "tcp://127.0.0.1:*", topic=f"kv@{ENGINE_B}@{MODEL}")
    no_port = EventPublisher("tcp://127.0.0.1:*", topic=f"kv@{NO_PORT}@{MODEL}")
    engines_file = tmp_path_factory.mktemp("engines") / "engines.yaml"
    engines_file.write_text(f"engines:\n  - endpoint: {SILENT}\n    model: {MODEL}\n")
    sub_endpoint = f"tcp://127.0.0.1:{free_port()}"
    server = ServeProcess(
        [
            "--zmq-bind",
            sub_endpoint,
            "--accept-any-engine",
            "--zmq-connect",
            no_port.bound_endpoint,
            "--engines-file",
            str(engines_file),
            "--zmq-connect",
            a.bound_endpoint,
            "--zmq-connect",
            b.bound_endpoint,
            "--replay-endpoint",
            f"{ENGINE_A}={a.bound_replay_endpoint}",
            "--replay-endpoint",
            f"{ENGINE_B}={b.bound_replay_endpoint}",
            "--tokenizer",
            f"{MODEL}={model_dir}",
            "--lora",
            f"{ADAPTER}={MODEL}",
            "--block-size",
            str(BS),
            "--tier-weight",
            "gpu=1.0,cpu=0.8,storage=0.5",
            "--max-prompt-tokens",
            "4096",
        ]
    )
    try:
        server.wait_ready()
        tokenizer = load_tokenizer(str(model_dir))
        yield Cluster(server, a, b, no_port, tokenizer, model_dir, sub_endpoint)
    finally:
        code = server.stop()
        for pub in (a, b, no_port):
            pub.close()
    assert code == 0, server.logs()


def test_scores_by_token_ids_prompt_and_chat(cluster: Cluster) -> None:
    prompt = {"model": MODEL, "prompt": PROMPT}
    chat = {"model": MODEL, "messages": MESSAGES}
    prompt_ids, chat_ids = cluster.ids(prompt), cluster.ids(chat)
    assert len(prompt_ids) >= 4 * BS and len(chat_ids) >= 4 * BS
    cluster.publish_until(cluster.a, sim_stored(prompt_ids, 1_000), prompt)
    cluster.publish_until(cluster.b, sim_stored(chat_ids, 2_000), chat)

    by_prompt = cluster.server.score(prompt)
    by_tokens = cluster.server.score({"model": MODEL, "token_ids": prompt_ids})
    by_chat = cluster.server.score(chat)
    assert by_prompt[ENGINE_A] == len(prompt_ids) // BS
    assert by_tokens == by_prompt
    assert by_chat[ENGINE_B] == len(chat_ids) // BS
    # A partial prompt: only its own full blocks can match.
    half = {"model": MODEL, "token_ids": prompt_ids[: 2 * BS + 3]}
    assert cluster.server.score(half)[ENGINE_A] == 2


def test_lora_and_cache_salt_key_separately(cluster: Cluster) -> None:
    lora_ids = cluster.ids({"model": MODEL, "prompt": "adapter traffic " * 20})
    salted_ids = cluster.ids({"model": MODEL, "prompt": "salted tenant prompt " * 20})
    lora_body = {"model": ADAPTER, "token_ids": lora_ids}
    salted_body = {"model": MODEL, "token_ids": salted_ids, "cache_salt": "tenant-1"}
    cluster.publish_until(cluster.a, sim_stored(lora_ids, 3_000, lora=ADAPTER), lora_body)
    cluster.publish_until(cluster.b, sim_stored(salted_ids, 4_000, salt="tenant-1"), salted_body)

    assert cluster.server.score(lora_body)[ENGINE_A] == len(lora_ids) // BS
    # The same ids under the base model or an explicit lora field.
    assert ENGINE_A not in cluster.server.score({"model": MODEL, "token_ids": lora_ids})
    explicit = {"model": MODEL, "lora": ADAPTER, "token_ids": lora_ids}
    assert cluster.server.score(explicit)[ENGINE_A] == len(lora_ids) // BS
    assert cluster.server.score(salted_body)[ENGINE_B] == len(salted_ids) // BS
    assert ENGINE_B not in cluster.server.score({"model": MODEL, "token_ids": salted_ids})
    other_salt = {"model": MODEL, "token_ids": salted_ids, "cache_salt": "tenant-2"}
    assert ENGINE_B not in cluster.server.score(other_salt)


def test_grpc_scores_match_http(cluster: Cluster) -> None:
    body = {"model": MODEL, "prompt": PROMPT}
    ids = cluster.ids(body)
    cluster.publish_until(cluster.a, sim_stored(ids, 1_000), body)
    http_scores = cluster.server.score(body)
    with grpc.insecure_channel(f"127.0.0.1:{cluster.server.grpc_port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)

        def serving() -> bool:
            reply = health.Check(health_pb2.HealthCheckRequest(service="kvindex.v1.KVIndex"))
            return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

        wait_for(serving, what="gRPC health SERVING")
        kv = kvindex_pb2_grpc.KVIndexStub(channel)
        reply = kv.ScoreTokens(kvindex_pb2.ScoreTokensRequest(model=MODEL, token_ids=ids))
        assert {s.engine: s.matched_blocks for s in reply.scores} == http_scores
        assert reply.block_size == BS and reply.total_blocks == len(ids) // BS
        chat = kv.ScoreChat(
            kvindex_pb2.ScoreChatRequest(
                model=MODEL, messages=[kvindex_pb2.ChatMessage(**m) for m in MESSAGES]
            )
        )
        assert {s.engine: s.matched_blocks for s in chat.scores} == cluster.server.score(
            {"model": MODEL, "messages": MESSAGES}
        )
        llmd = indexer_pb2_grpc.IndexerServiceStub(channel)
        pods = llmd.GetPodScores(indexer_pb2.GetPodScoresRequest(prompt=PROMPT, model_name=MODEL))
        assert {p.pod: p.score for p in pods.scores}[ENGINE_A] == float(len(ids) // BS)
        with pytest.raises(grpc.RpcError) as missing:
            kv.ScoreTokens(kvindex_pb2.ScoreTokensRequest(model="nope", token_ids=ids))
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND


def test_debug_shows_event_stats_and_doctor_prints_a_report(cluster: Cluster) -> None:
    body = {"model": MODEL, "prompt": PROMPT}
    cluster.publish_until(cluster.a, sim_stored(cluster.ids(body), 1_000), body)
    status, report = cluster.server.get(f"/v1/debug?model={MODEL}&prompt=hello%20world")
    assert status == 200, report
    events = {e["engine"]: e for e in report["events"]}
    assert events[ENGINE_A]["batches"] >= 1
    assert events[ENGINE_A]["events"]["BlockStored"] >= 1
    assert events[ENGINE_A]["last_seq"] is not None and events[ENGINE_A]["model"] == MODEL
    assert events[ENGINE_A]["last_batch_time"] > 0
    assert events[ENGINE_A]["discovered"] is False  # static --zmq-connect, not discovery
    assert events[SILENT]["discovered"] is True and events[SILENT]["batches"] == 0
    warnings = {(w["code"], w["engine"]) for w in report["warnings"]}
    assert ("no_events", SILENT) in warnings

    ids = cluster.ids(body)

    def no_port_seen() -> bool:
        cluster.no_port.publish(sim_stored(ids, 9_000))
        status, data = cluster.server.get(f"/v1/debug?model={MODEL}&prompt=x")
        return status == 200 and any(e["engine"] == NO_PORT for e in data["events"])

    wait_for(no_port_seen, what="the port-less engine's events")
    _, report = cluster.server.get(f"/v1/debug?model={MODEL}&prompt=x")
    assert ("engine_without_port", NO_PORT) in {
        (w["code"], w["engine"]) for w in report["warnings"]
    }
    assert cluster.server.metric("kvindex_ingest_topic_without_port_total", engine=NO_PORT)
    done = subprocess.run(
        [
            *KVINDEX,
            "doctor",
            "--index-url",
            cluster.server.base,
            "--model",
            MODEL,
            "--prompt",
            PROMPT,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1, done.stderr  # 1: the report has warnings (the silent engine)
    assert ENGINE_A in done.stdout and SILENT in done.stdout


def test_bad_input_is_refused_and_counted(cluster: Cluster) -> None:
    server = cluster.server
    status, data = server.post("/v1/score", {"model": "no-such-model", "prompt": "hi"})
    assert status == 404 and data["error"]["reason"] == "unknown_model"
    status, data = http("POST", server.base + "/v1/score", raw=b"{not json")
    assert status == 400 and data["error"]["reason"] == "bad_json"
    status, data = server.post("/v1/score", {"model": MODEL, "token_ids": [1] * 5000})
    assert status == 413 and data["error"]["reason"] == "prompt_too_long"
    status, data = server.post("/v1/score", {"model": MODEL})
    assert status == 400
    for reason in ("unknown_model", "bad_json", "prompt_too_long"):
        assert server.metric("kvindex_score_errors_total", api="http", reason=reason) >= 1
    assert server.metric("kvindex_score_requests_total", api="http", method="score", outcome="ok")
    lookups = server.metric("kvindex_tokenizer_cache_hits_total", model=MODEL)
    lookups += server.metric("kvindex_tokenizer_cache_misses_total", model=MODEL)
    lookups += server.metric("kvindex_tokenizer_uncached_calls_total", model=MODEL)
    assert lookups > 0  # the tokenizers' cache on the same registry


def test_a_tokenizer_that_cannot_load_fails_fast(tmp_path: Path) -> None:
    done = subprocess.run(
        [
            *KVINDEX,
            "serve",
            "--http-port",
            "0",
            "--zmq-bind",
            "tcp://127.0.0.1:*",
            "--accept-any-engine",
            "--tokenizer",
            f"m={tmp_path / 'missing'}",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "--tokenizer" in done.stderr and "missing" in done.stderr


def test_speculative_entries_extend_scores(cluster: Cluster) -> None:
    ids = cluster.ids({"model": MODEL, "prompt": "a brand new prefix nobody holds yet " * 9})
    body = {"model": MODEL, "token_ids": ids}
    assert ENGINE_B not in cluster.server.score(body)
    status, data = cluster.server.post("/v1/speculative", {**body, "engine": ENGINE_B})
    assert status == 200 and data["recorded_blocks"] == len(ids) // BS
    # Scored for the next turn (the prompt and more): every recorded block counts.
    _, scored = cluster.server.post("/v1/score", {**body, "token_ids": [*ids, 7]})
    best = scored["scores"][0]
    assert best["engine"] == ENGINE_B and best["speculative_blocks"] == len(ids) // BS


async def _poll(check: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await asyncio.to_thread(check):
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def test_a_simulated_vllm_engine_is_scored_on_its_own_requests(cluster: Cluster) -> None:
    """A SimServer (vLLM's HTTP API, tokenizing with the same model directory) publishes real
    events for the requests it serves, into the service's bound SUB socket."""
    sim = SimServer(
        ServerConfig(
            engine=EngineConfig(model=MODEL, block_size=BS),
            kv_events=KVEventsOptions(endpoint=cluster.sub_endpoint),
        ),
        load_sim_tokenizer(str(cluster.model_dir)),
    )
    await sim.start("127.0.0.1", 0)
    engine = f"127.0.0.1:{sim.port}"
    server = cluster.server
    try:
        async with aiohttp.ClientSession() as session:

            async def complete(path: str, request: dict[str, Any]) -> None:
                payload = {"model": MODEL, "max_tokens": 1, **request}
                async with session.post(sim.url + path, json=payload) as response:
                    assert response.status == 200, await response.text()

            def seen() -> bool:
                status, data = server.get(f"/v1/debug?model={MODEL}&prompt=x")
                return status == 200 and any(e["engine"] == engine for e in data["events"])

            for i in range(500):  # PUB/SUB joins late: warm up until a batch arrives
                await complete("/v1/completions", {"prompt": f"warm up {i} " * 8})
                if await asyncio.to_thread(seen):
                    break
            prompt = "Routers should send a request where its prefix is cached. " * 5
            await complete("/v1/completions", {"prompt": prompt})
            await complete("/v1/chat/completions", {"messages": MESSAGES})
            want_prompt = len(cluster.ids({"prompt": prompt})) // BS
            want_chat = len(cluster.ids({"messages": MESSAGES})) // BS
            await _poll(
                lambda: server.score({"model": MODEL, "prompt": prompt}).get(engine) == want_prompt,
                "the engine's prompt blocks",
            )
            await _poll(
                lambda: (
                    server.score({"model": MODEL, "messages": MESSAGES}).get(engine) == want_chat
                ),
                "the engine's chat blocks",
            )
    finally:
        await sim.stop()


def test_an_engine_block_size_the_index_cannot_divide_is_reported(cluster: Cluster) -> None:
    """24-token engine blocks under the index's 16: nothing can be indexed for that engine,
    and the service says so (gauge, /v1/debug, log) instead of scoring it 0 in silence."""
    import zmq

    engine = "127.0.0.1:8003"
    pub = zmq.Context.instance().socket(zmq.PUB)
    pub.connect(cluster.sub_endpoint)
    payload = encode_batch([stored([1], None, list(range(24)), block_size=24)])
    try:

        def reported() -> bool:
            pub.send_multipart(frame(f"kv@{engine}@{MODEL}".encode(), 0, payload))
            return cluster.server.metric("kvindex_engines_block_size_unindexable") == 1.0

        wait_for(reported, what="the unindexable engine reported")
    finally:
        pub.close(linger=0)
    _, report = cluster.server.get(f"/v1/debug?model={MODEL}&prompt=x")
    stats = {e["engine"]: e for e in report["events"]}[engine]
    assert (stats["block_size"], stats["block_size_indexable"]) == (24, False)
    assert stats["skipped"]["block_size_not_multiple"] >= 1
    assert "block_size_mismatch" in {w["code"] for w in report["warnings"]}
    assert "event=engine_block_size_unindexable" in cluster.server.logs()
    assert cluster.server.logs().count("event=engine_block_size_unindexable") == 1
