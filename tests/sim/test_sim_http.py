"""The simulated vLLM server over real HTTP and real ZMQ (loopback, ports chosen at run time)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import msgspec
import pytest
from simzmq import replay_request

from kvindex.tokenize import Tokenizer
from kvindex.vllm_hash import RequestExtras, request_block_hashes, wire_value
from kvtools.sim.engine import EngineConfig, SlidingWindowGroup
from kvtools.sim.http import DP_RANK_HEADER, ENGINE_HEADER, KVEventsOptions, ServerConfig, SimServer
from kvtools.sim.timing import TimingModel
from kvtools.sim.tokenizer import ByteTokenizer, FileTokenizer
from tests.metrics import metric_families

FAST = TimingModel(0.0, 0.0, 0.0)
LOOPBACK = "tcp://127.0.0.1:*"

Start = Callable[..., Awaitable[SimServer]]


@pytest.fixture(scope="module")
def deepseek() -> FileTokenizer:
    return FileTokenizer()


@pytest.fixture
async def start() -> AsyncIterator[Start]:
    servers: list[SimServer] = []

    async def make(tokenizer: Tokenizer | None = None, dp: int = 1, **engine: Any) -> SimServer:
        engine.setdefault("timing", FAST)
        cfg = ServerConfig(
            engine=EngineConfig(**engine),
            kv_events=KVEventsOptions(endpoint=LOOPBACK, replay_endpoint=LOOPBACK),
            engine_id=f"engine-{len(servers)}",
            data_parallel_size=dp,
        )
        server = SimServer(cfg, tokenizer or ByteTokenizer())
        await server.start("127.0.0.1", 0)
        servers.append(server)
        return server

    yield make
    for server in servers:
        await server.stop()


def events_of(server: SimServer, rank: int = 0, start: int = 0) -> list[list[Any]]:
    """Every batch the rank published, via the replay socket: [[seq, batch], ...]."""
    pub = server.publishers[rank]
    assert pub is not None and pub.flush()
    return [[f.seq, f.batch()] for f in replay_request(pub.bound_replay_endpoint or "", start)]


def flat_events(server: SimServer, rank: int = 0) -> list[dict[str, Any]]:
    return [ev for _, batch in events_of(server, rank) for ev in batch[1]]


async def post(
    server: SimServer, path: str, body: Any, headers: dict[str, str] | None = None
) -> tuple[int, Any, Any]:
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            server.url + path,
            data=body if isinstance(body, bytes) else json.dumps(body),
            headers=headers,
        ) as r,
    ):
        text = await r.text()
        try:
            parsed = json.loads(text) if text else None
        except json.JSONDecodeError:
            parsed = text
        return r.status, parsed, r.headers


async def get_text(server: SimServer, path: str) -> str:
    async with aiohttp.ClientSession() as s, s.get(server.url + path) as r:
        assert r.status == 200
        return await r.text()


PROMPT = "The quick brown fox jumps over the lazy dog, again and again, until the blocks fill. " * 2


async def test_completion_twice_reports_cached_tokens(
    start: Start, deepseek: FileTokenizer
) -> None:
    server = await start(deepseek, block_size=16)
    body = {"model": "sim-model", "prompt": PROMPT, "max_tokens": 4}
    status, first, headers = await post(server, "/v1/completions", body)
    assert status == 200 and headers[ENGINE_HEADER] == "engine-0"
    assert first["object"] == "text_completion" and first["choices"][0]["finish_reason"] == "length"
    tokens = deepseek.encode(PROMPT)
    assert first["usage"]["prompt_tokens"] == len(tokens) and len(tokens) > 32
    assert first["usage"]["completion_tokens"] == 4
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    _, second, _ = await post(server, "/v1/completions", body)
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] == (len(tokens) - 1) // 16 * 16
    assert second["choices"][0]["text"] == first["choices"][0]["text"]  # deterministic output

    # The first batch announces the prompt's full blocks with vLLM's own hashes.
    batches = events_of(server)
    assert batches[0][0] == 0
    stored = batches[0][1][1][0]
    expected = request_block_hashes(tokens, 16, RequestExtras(), "sha256_cbor", "0")
    assert stored["type"] == "BlockStored" and stored["parent_block_hash"] is None
    assert stored["block_hashes"] == [wire_value(d) for d in expected]
    assert stored["token_ids"] == tokens[: len(expected) * 16]
    assert stored["block_size"] == 16 and stored["medium"] == "GPU"
    # vLLM's default report mode ("incremental", the simulator's too): the second request's
    # hits are not reported again.
    later = [e for _, b in batches[1:] for e in b[1] if e["type"] == "BlockStored"]
    assert not any(e["block_hashes"][0] == stored["block_hashes"][0] for e in later)
    # vllm_xargs kv_cache_report_mode "full": the hits are reported again, from block 0 with
    # parent None, first in the batch.
    full = {**body, "vllm_xargs": {"kv_cache_report_mode": "full"}}
    await post(server, "/v1/completions", full)
    new = [e for _, b in events_of(server)[len(batches) :] for e in b[1]]
    again = [e for e in new if e["type"] == "BlockStored"]
    assert again[0]["parent_block_hash"] is None
    assert again[0]["block_hashes"] == stored["block_hashes"][: (len(tokens) - 1) // 16]


async def test_token_id_prompt_and_tokenize(start: Start, deepseek: FileTokenizer) -> None:
    server = await start(deepseek, block_size=4)
    status, tok, _ = await post(
        server, "/tokenize", {"model": "sim-model", "prompt": "hello world"}
    )
    assert status == 200
    assert tok == {
        "count": len(tok["tokens"]),
        "max_model_len": 32768,
        "tokens": deepseek.encode("hello world"),
        "token_strs": None,
    }
    messages = [{"role": "user", "content": "hi"}]
    _, chat_tok, _ = await post(server, "/tokenize", {"messages": messages})
    assert chat_tok["tokens"] == deepseek.apply_chat_template(messages)
    status, out, _ = await post(
        server, "/v1/completions", {"prompt": list(range(9)), "max_tokens": 1}
    )
    assert status == 200 and out["usage"]["prompt_tokens"] == 9


async def read_sse(server: SimServer, path: str, body: dict[str, Any]) -> list[Any]:
    async with aiohttp.ClientSession() as s, s.post(server.url + path, json=body) as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
        raw = await r.text()
    events = [chunk for chunk in raw.split("\n\n") if chunk]
    assert all(chunk.startswith("data: ") for chunk in events)
    assert events[-1] == "data: [DONE]"
    return [json.loads(chunk[6:]) for chunk in events[:-1]]


async def test_sse_chat_stream_shape(start: Start) -> None:
    server = await start()
    body = {
        "messages": [{"role": "user", "content": "x" * 40}],
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": 3,
    }
    chunks = await read_sse(server, "/v1/chat/completions", body)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    content = [c for c in chunks[1:] if c["choices"] and "content" in c["choices"][0]["delta"]]
    assert len(content) == 3
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == []
    usage = chunks[-1]["usage"]
    assert usage["completion_tokens"] == 3 and usage["prompt_tokens_details"] == {
        "cached_tokens": 0
    }
    again = await read_sse(server, "/v1/chat/completions", body)
    assert again[-1]["usage"]["prompt_tokens_details"]["cached_tokens"] > 0


async def test_sse_completion_without_usage(start: Start) -> None:
    server = await start()
    chunks = await read_sse(
        server, "/v1/completions", {"prompt": "abc", "stream": True, "max_tokens": 2}
    )
    assert [c["object"] for c in chunks] == ["text_completion"] * 3
    assert all("usage" not in c for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


async def test_metrics_parse_with_vllm_names(start: Start) -> None:
    server = await start(block_size=4, num_gpu_blocks=64, lora_adapters={"sql": "/a/sql"})
    await post(server, "/v1/completions", {"prompt": "a" * 20, "max_tokens": 1})
    await post(server, "/v1/completions", {"prompt": "a" * 20, "max_tokens": 1})
    families = metric_families(await get_text(server, "/metrics"))
    for name in (
        "vllm:num_requests_waiting",
        "vllm:num_requests_running",
        "vllm:kv_cache_usage_perc",
        "vllm:lora_requests_info",
        "vllm:cache_config_info",
        "vllm:prefix_cache_queries",
        "vllm:prefix_cache_hits",
    ):
        assert name in families, name
    queries = families["vllm:prefix_cache_queries"].samples[0]
    assert queries.name == "vllm:prefix_cache_queries_total" and queries.value == 40
    assert families["vllm:prefix_cache_hits"].samples[0].value == 16
    info = families["vllm:cache_config_info"].samples[0].labels
    assert info["block_size"] == "4" and info["num_gpu_blocks"] == "64"
    lora = families["vllm:lora_requests_info"].samples[0].labels
    assert set(lora) == {"max_lora", "waiting_lora_adapters", "running_lora_adapters"}
    assert families["vllm:num_requests_running"].samples[0].labels["model_name"] == "sim-model"


async def test_queueing_and_running_lora_metrics(start: Start) -> None:
    server = await start(
        max_num_seqs=1, lora_adapters={"sql": "/a/sql"}, timing=TimingModel(0.0, 0.02, 1.0)
    )
    slow = asyncio.create_task(
        post(server, "/v1/completions", {"model": "sql", "prompt": "abcd", "max_tokens": 40})
    )
    queued = asyncio.create_task(
        post(server, "/v1/completions", {"prompt": "efgh", "max_tokens": 1})
    )
    deadline = asyncio.get_running_loop().time() + 10
    while True:
        fams = metric_families(await get_text(server, "/metrics"))
        running = fams["vllm:num_requests_running"].samples[0].value
        waiting = fams["vllm:num_requests_waiting"].samples[0].value
        if running == 1 and waiting == 1:
            break
        assert asyncio.get_running_loop().time() < deadline, "never saw 1 running + 1 waiting"
        await asyncio.sleep(0.005)
    assert fams["vllm:lora_requests_info"].samples[0].labels["running_lora_adapters"] == "sql"
    assert (await slow)[0] == 200 and (await queued)[0] == 200


async def _running_waiting(server: SimServer) -> tuple[float, float]:
    fams = metric_families(await get_text(server, "/metrics"))
    return (
        fams["vllm:num_requests_running"].samples[0].value,
        fams["vllm:num_requests_waiting"].samples[0].value,
    )


async def test_a_client_that_disconnects_aborts_its_request(start: Start) -> None:
    """As vLLM's API server (`with_cancellation`): a client gone mid-prefill frees its slot
    at once, so a waiting request starts instead of waiting out the abandoned one (its
    prefill here: 18 s)."""
    server = await start(max_num_seqs=1, timing=TimingModel(0.3, 0.0, 1.0))
    session = aiohttp.ClientSession()
    body = {"prompt": "x" * 60, "max_tokens": 1, "stream": True}
    gone = asyncio.create_task(session.post(server.url + "/v1/completions", json=body))
    deadline = asyncio.get_running_loop().time() + 10
    while await _running_waiting(server) != (1, 0):
        assert asyncio.get_running_loop().time() < deadline, "the first request never ran"
        await asyncio.sleep(0.005)
    queued = asyncio.create_task(post(server, "/v1/completions", {"prompt": "ab", "max_tokens": 1}))
    while await _running_waiting(server) != (1, 1):
        assert asyncio.get_running_loop().time() < deadline, "the second never waited"
        await asyncio.sleep(0.005)
    response = await gone
    response.close()  # the client walks away: the connection closes mid-request
    await session.close()
    # The second (under 1 s) starts when the slot frees; the first would take 18 s more.
    status, _, _ = await asyncio.wait_for(queued, 15)
    assert status == 200
    assert server.engines[0].stats.requests_finished == 1


async def test_eviction_emits_block_removed(start: Start) -> None:
    server = await start(block_size=4, num_gpu_blocks=6)
    for i in range(4):
        status, _, _ = await post(
            server,
            "/v1/completions",
            {"prompt": list(range(i * 100, i * 100 + 12)), "max_tokens": 0},
        )
        assert status == 200
    events = flat_events(server)
    stored = {h for e in events if e["type"] == "BlockStored" for h in e["block_hashes"]}
    removed = [e for e in events if e["type"] == "BlockRemoved"]
    assert removed, "a 6-block pool must evict"
    assert all(h in stored for e in removed for h in e["block_hashes"])
    assert all(e["medium"] == "GPU" for e in removed)


async def test_lora_and_cache_salt_in_events_and_hashes(start: Start) -> None:
    server = await start(block_size=4, lora_adapters={"sql": "/adapters/sql"})
    prompt = list(range(12))
    status, out, _ = await post(
        server,
        "/v1/completions",
        {"model": "sql", "prompt": prompt, "max_tokens": 0, "cache_salt": "t1"},
    )
    assert status == 200 and out["model"] == "sql"
    (ev,) = flat_events(server)
    assert ev["lora_name"] == "sql"
    assert ev["extra_keys"] == [["sql", "t1"], ["sql"], ["sql"]]
    extras = RequestExtras(lora_name="sql", lora_path="/adapters/sql", cache_salt="t1")
    expected = request_block_hashes(prompt, 4, extras, "sha256_cbor", "0")
    assert ev["block_hashes"] == [wire_value(d) for d in expected]
    # Same tokens without LoRA/salt: different chain, so no hit.
    _, plain, _ = await post(server, "/v1/completions", {"prompt": prompt, "max_tokens": 0})
    assert plain["usage"]["prompt_tokens_details"]["cached_tokens"] == 0


async def test_data_parallel_ranks(start: Start) -> None:
    server = await start(dp=2, block_size=4)
    endpoints = {r["endpoint"] for r in server.state()["ranks"]}
    assert len(endpoints) == 2
    status, _, headers = await post(
        server,
        "/v1/completions",
        {"prompt": "abcdefgh", "max_tokens": 0},
        headers={"X-data-parallel-rank": "1"},
    )
    assert status == 200 and headers[DP_RANK_HEADER] == "1"
    batches = events_of(server, rank=1)
    assert batches and all(b[1][2] == 1 for b in batches)
    pub0 = server.publishers[0]
    assert pub0 is not None and pub0.next_seq == 0
    status, err, _ = await post(
        server, "/v1/completions", {"prompt": "a"}, headers={"X-data-parallel-rank": "7"}
    )
    assert status == 400 and "0..1" in err["error"]["message"]


async def test_reset_prefix_cache_and_restart(start: Start) -> None:
    server = await start(block_size=4)
    body = {"prompt": "abcdefghijkl", "max_tokens": 0}
    await post(server, "/v1/completions", body)
    status, _, _ = await post(server, "/reset_prefix_cache", {})
    assert status == 200
    # As vLLM: AllBlocksCleared goes out with the next engine step's batch, first in it.
    assert {"type": "AllBlocksCleared"} not in flat_events(server)
    _, out, _ = await post(server, "/v1/completions", body)
    assert out["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    pub = server.publishers[0]
    assert pub is not None and pub.flush() and pub.next_seq == 2
    assert events_of(server)[1][1][1][0] == {"type": "AllBlocksCleared"}
    status, state, _ = await post(server, "/admin/restart", {})
    assert status == 200 and state["ranks"][0]["next_seq"] == 0
    assert state["ranks"][0]["cached_blocks"] == 0
    assert events_of(server) == []
    _, out, _ = await post(server, "/v1/completions", body)
    assert out["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert [seq for seq, _ in events_of(server)] == [0]


async def test_hybrid_sliding_window_group_events(start: Start) -> None:
    server = await start(block_size=4, sliding_window=SlidingWindowGroup(8, 64, 32))
    await post(server, "/v1/completions", {"prompt": list(range(16)), "max_tokens": 0})
    events = flat_events(server)
    groups = {(e["group_idx"], e["kv_cache_spec_kind"], e["block_size"]) for e in events}
    assert groups == {(0, "full_attention", 4), (1, "sliding_window", 8)}
    sw = next(e for e in events if e["group_idx"] == 1)
    assert sw["kv_cache_spec_sliding_window"] == 64 and len(sw["block_hashes"]) == 2


async def test_models_health_and_bad_requests(start: Start) -> None:
    server = await start(lora_adapters={"sql": "/a/sql"}, max_model_len=64)
    async with aiohttp.ClientSession() as s:
        async with s.get(server.url + "/health") as r:
            assert r.status == 200
        async with s.get(server.url + "/v1/models") as r:
            models = await r.json()
    assert [m["id"] for m in models["data"]] == ["sim-model", "sql"]
    assert models["data"][1]["parent"] == "sim-model"
    cases = [
        (b"{not json", 400, "not valid JSON"),
        ({"model": "nope", "prompt": "x"}, 404, "does not exist"),
        ({"prompt": "x" * 100}, 400, "maximum context length"),
        ({"prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
        ({"prompt": 5}, 400, "prompt must be"),
        ({"prompt": "x", "cache_salt": 3}, 400, "cache_salt"),
        ({"prompt": "x", "n": 2}, 400, "n must be 1"),
    ]
    for body, status, message in cases:
        got, err, _ = await post(server, "/v1/completions", body)
        assert got == status and message in err["error"]["message"], (body, err)
    got, err, _ = await post(server, "/v1/chat/completions", {"messages": []})
    assert got == 400 and "messages" in err["error"]["message"]
    fams = metric_families(await get_text(server, "/metrics"))
    by_reason = {
        s.labels["reason"]: s.value
        for s in fams["kvsim_bad_requests"].samples
        if s.name.endswith("_total")
    }
    assert sum(by_reason.values()) == 8 and by_reason["unknown_model"] == 1


async def test_fault_endpoint(start: Start) -> None:
    server = await start()
    status, err, _ = await post(server, "/admin/faults", {"drop_fraction": 2})
    assert status == 400 and "drop_fraction" in err["error"]["message"]
    status, _, _ = await post(server, "/admin/faults", {"bogus": 1})
    assert status == 400
    status, _, _ = await post(server, "/admin/faults", {"publishing": False, "metrics_delay_s": 2})
    assert status == 200
    await post(server, "/v1/completions", {"prompt": "abcdefghijklmnopq", "max_tokens": 0})
    pub = server.publishers[0]
    assert pub is not None and pub.flush() and pub.next_seq == 0  # nothing published
    async with aiohttp.ClientSession() as s:
        with pytest.raises(asyncio.TimeoutError):
            async with s.get(server.url + "/metrics", timeout=aiohttp.ClientTimeout(total=0.3)):
                pass
    await post(
        server, "/admin/faults", {"publishing": True, "drop_fraction": 1.0, "metrics_delay_s": 0}
    )
    await post(server, "/v1/completions", {"prompt": "zyxwvutsrqponmlkj", "max_tokens": 0})
    assert pub.flush() and pub.next_seq == 1 and pub.stats.dropped == 1
    assert msgspec.msgpack.decode(replay_request(pub.bound_replay_endpoint or "")[0].payload)


async def test_cpu_offload_tier(start: Start) -> None:
    server = await start(block_size=4, num_gpu_blocks=4, num_cpu_blocks=16)
    first = {"prompt": list(range(13)), "max_tokens": 0}
    await post(server, "/v1/completions", first)
    await post(server, "/v1/completions", {"prompt": list(range(100, 116)), "max_tokens": 0})
    events = flat_events(server)
    gpu_stored = next(e for e in events if e["type"] == "BlockStored")
    cpu_stored = [e for e in events if e["type"] == "BlockStored" and e["medium"] == "CPU"]
    gpu_removed = [h for e in events if e["type"] == "BlockRemoved" for h in e["block_hashes"]]
    assert sorted(h for e in cpu_stored for h in e["block_hashes"]) == sorted(gpu_removed)
    assert set(gpu_removed) == set(gpu_stored["block_hashes"])
    # Evicted from GPU, still on CPU: the prefix is served from the offload tier.
    _, out, _ = await post(server, "/v1/completions", first)
    assert out["usage"]["prompt_tokens_details"]["cached_tokens"] == 12
    fams = metric_families(await get_text(server, "/metrics"))
    assert fams["vllm:cache_config_info"].samples[0].labels["num_cpu_blocks"] == "16"


@pytest.mark.parametrize("algo", ["sha256", "sha256_cbor", "xxhash", "xxhash_cbor"])
async def test_every_hash_algo_on_the_wire(start: Start, algo: str) -> None:
    server = await start(block_size=4, hash_algo=algo, hash_seed="42")
    prompt = list(range(9))
    await post(server, "/v1/completions", {"prompt": prompt, "max_tokens": 0})
    (ev,) = flat_events(server)
    expected = request_block_hashes(prompt, 4, RequestExtras(), algo, "42")  # type: ignore[arg-type]
    assert ev["block_hashes"] == [wire_value(d) for d in expected]
    fams = metric_families(await get_text(server, "/metrics"))
    assert fams["vllm:cache_config_info"].samples[0].labels["prefix_caching_hash_algo"] == algo
