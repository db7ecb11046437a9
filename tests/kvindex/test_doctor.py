"""The doctor: the pure report, /v1/debug over real HTTP (with an engine /tokenize endpoint on
loopback), and the `kvindex doctor` CLI against the running service."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from score_fixtures import BATCH_TS, Registry, deepseek, store_prompt, stored_event

from kvindex import cli
from kvindex.doctor import EngineEventStats, compare_tokens, diagnose, has_port
from kvindex.index import MemoryIndex, Remove, Tier
from kvindex.ingest import EventApplier
from kvindex.scoring import Scorer
from kvindex.service.score_api import ScoreMetrics, ScoreService
from kvindex.service.score_http import add_score_routes
from kvindex.wire import decode_batch
from tests.events import encode_batch

MODEL = "deepseek-ai/DeepSeek-V3"
TEXT = "The quarterly numbers show steady growth across every region. " * 20


def codes(report: Any) -> list[tuple[str, str | None]]:
    return [(w.code, w.engine) for w in report.warnings]


def test_has_port() -> None:
    assert has_port("10.0.0.1:8000")
    assert has_port("[fd00::1]:8000")
    assert has_port("pod-a.ns.svc:80")
    assert not has_port("10.0.0.1")
    assert not has_port("[fd00::1]")
    assert not has_port("fd00::1")


def test_report_blocks_matches_and_warnings() -> None:
    index = MemoryIndex()
    tokens = list(range(160))  # 10 blocks
    hashes = store_prompt(index, "10.0.0.1:8000", MODEL, tokens)
    index.apply("10.0.0.1:8000", [Remove(Tier.GPU, [hashes[4]])])  # a hole at block 4
    store_prompt(index, "10.0.0.2", MODEL, tokens[:32], medium="CPU")  # topic without port
    applier = EventApplier(index)
    event, _ = stored_event(list(range(5000, 5024)), block_size=24)
    batch = decode_batch(encode_batch([event], ts=BATCH_TS, omit_defaults=False))
    skipped = applier.apply_batch("10.0.0.3:8000", batch, MODEL).skipped
    events = [
        EngineEventStats("10.0.0.1:8000", MODEL, batches=3, events={"BlockStored": 2}, last_seq=2),
        EngineEventStats("10.0.0.3:8000", MODEL, batches=1, skipped=dict(skipped)),
        EngineEventStats("10.0.0.4:8000", MODEL, batches=0),
    ]
    result = Scorer(index).score_tokens(MODEL, tokens)
    checks = [compare_tokens("http://10.0.0.1:8000", tokens, [*tokens[:20], 9, 9], None)]
    report = diagnose(index, result, events, checks)

    assert report.total_blocks == 10
    assert [b.holders for b in report.blocks[:3]] == [
        {"10.0.0.1:8000": "gpu", "10.0.0.2": "cpu"},
    ] * 2 + [{"10.0.0.1:8000": "gpu"}]
    assert report.blocks[4].holders == {}
    assert len(report.blocks[0].key) == 16
    matches = {m.engine: m for m in report.engines}
    assert (matches["10.0.0.1:8000"].matched_blocks, matches["10.0.0.1:8000"].stops_at) == (4, 4)
    assert matches["10.0.0.1:8000"].holds_later == 5
    assert matches["10.0.0.2"].stops_at == 2
    assert codes(report) == [
        ("engine_without_port", "10.0.0.2"),
        ("block_size_mismatch", "10.0.0.3:8000"),
        ("no_events", "10.0.0.4:8000"),
        ("token_mismatch", None),
    ]
    assert "multiple of 16" in report.warnings[1].fix
    assert "from token 20" in report.warnings[3].message
    as_json = report.to_builtins()
    assert json.loads(json.dumps(as_json))["engines"][0]["engine"] == "10.0.0.1:8000"


def test_cold_prompt_warns_and_clean_prompt_does_not() -> None:
    index = MemoryIndex()
    store_prompt(index, "10.0.0.1:8000", MODEL, list(range(64)))
    scorer = Scorer(index)
    cold = diagnose(index, scorer.score_tokens(MODEL, list(range(100, 164))))
    assert codes(cold) == [("no_engine_holds_first_block", None)]
    warm = diagnose(index, scorer.score_tokens(MODEL, list(range(64))))
    assert warm.warnings == []
    assert warm.engines[0].stops_at is None


def test_compare_tokens() -> None:
    assert compare_tokens("u", [1, 2], [1, 2], None).ok
    assert compare_tokens("u", [1, 2], [1, 2, 3], None).first_difference == 2
    failed = compare_tokens("u", [1], None, "refused")
    assert (failed.ok, failed.error) == (False, "refused")


# -- over HTTP -----------------------------------------------------------------------------


@dataclass
class Setup:
    index: MemoryIndex
    client: TestClient[Any, Any]
    base_url: str
    engine_ok: str
    engine_bad: str


async def engine_app(shift: bool) -> web.Application:
    """An engine's /tokenize (vLLM request/response shape) on real HTTP; `shift` makes it
    tokenize differently (a stand-in for a mismatched tokenizer revision)."""

    async def tokenize(request: web.Request) -> web.Response:
        body = await request.json()
        tok = deepseek()
        if "messages" in body:
            ids = tok.apply_chat_template(body["messages"], body.get("add_generation_prompt", True))
        else:
            ids = tok.encode(body["prompt"], body.get("add_special_tokens", True))
        if shift:
            ids = [*ids[:30], 1, *ids[30:]]
        return web.json_response({"tokens": ids, "count": len(ids), "max_model_len": 1 << 16})

    app = web.Application()
    app.router.add_post("/tokenize", tokenize)
    return app


@pytest.fixture
async def setup() -> AsyncIterator[Setup]:
    index = MemoryIndex()
    service = ScoreService(Scorer(index), Registry({MODEL: deepseek()}), metrics=ScoreMetrics())

    def stats() -> list[EngineEventStats]:
        return [
            EngineEventStats("10.0.0.1:8000", MODEL, batches=2, events={"BlockStored": 2}),
            EngineEventStats("10.0.0.9:8000", MODEL, batches=0),
        ]

    app = web.Application()
    add_score_routes(app, service, stats_provider=stats)
    clients = [
        TestClient(TestServer(a, host="127.0.0.1", port=0))
        for a in (app, await engine_app(False), await engine_app(True))
    ]
    for client in clients:
        await client.start_server()
    urls = [str(c.make_url("")).rstrip("/") for c in clients]
    try:
        yield Setup(index, clients[0], urls[0], urls[1], urls[2])
    finally:
        for client in clients:
            await client.close()


async def test_debug_endpoint_post_and_get(setup: Setup) -> None:
    ids = deepseek().encode(TEXT)
    store_prompt(setup.index, "10.0.0.1:8000", MODEL, ids[:64])
    response = await setup.client.post(
        "/v1/debug",
        json={"model": MODEL, "prompt": TEXT, "engine_url": [setup.engine_ok, setup.engine_bad]},
    )
    report = await response.json()
    assert response.status == 200
    assert report["prompt_tokens"] == len(ids)
    assert report["engines"][0] == {
        "engine": "10.0.0.1:8000",
        "matched_blocks": 4,
        "score": 4 / (len(ids) // 16),
        "stops_at": 4,
        "holds_later": 0,
    }
    assert [c["ok"] for c in report["token_checks"]] == [True, False]
    assert report["token_checks"][1]["first_difference"] == 30
    assert [(w["code"], w["engine"]) for w in report["warnings"]] == [
        ("no_events", "10.0.0.9:8000"),
        ("token_mismatch", None),
    ]
    assert [e["engine"] for e in report["events"]] == ["10.0.0.1:8000", "10.0.0.9:8000"]

    response = await setup.client.get(
        "/v1/debug", params={"model": MODEL, "token_ids": ",".join(map(str, ids[:40]))}
    )
    report = await response.json()
    assert response.status == 200
    assert report["total_blocks"] == 2
    assert report["blocks"][0]["holders"] == {"10.0.0.1:8000": "gpu"}

    response = await setup.client.get("/v1/debug", params={"model": MODEL, "token_ids": "1,x"})
    assert response.status == 400


async def test_debug_engine_unreachable_is_a_warning(setup: Setup) -> None:
    response = await setup.client.post(
        "/v1/debug", json={"model": MODEL, "prompt": TEXT, "engine_url": free_url()}
    )
    report = await response.json()
    assert response.status == 200
    assert "engine_tokenize_failed" in [w["code"] for w in report["warnings"]]


def free_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


async def test_cli_renders_report_and_json(
    setup: Setup, capsys: pytest.CaptureFixture[str]
) -> None:
    ids = deepseek().encode(TEXT)
    store_prompt(setup.index, "10.0.0.1:8000", MODEL, ids)
    argv = ["doctor", "--index-url", setup.base_url, "--model", MODEL, "--prompt", TEXT]
    code = await asyncio.to_thread(cli.main, [*argv, "--engine-url", setup.engine_ok])
    out = capsys.readouterr().out
    assert code == 1  # the no_events warning for 10.0.0.9:8000
    assert "10.0.0.1:8000" in out
    assert "no_events" in out
    assert "tokens match" in out
    code = await asyncio.to_thread(cli.main, [*argv, "--json"])
    report = json.loads(capsys.readouterr().out)
    assert report["engines"][0]["matched_blocks"] == len(ids) // 16


async def test_cli_errors_name_the_fix(setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    code = await asyncio.to_thread(
        cli.main, ["doctor", "--index-url", free_url(), "--model", MODEL, "--prompt", "x"]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert "cannot reach the kvindex service" in err
    assert "--index-url" in err
    code = await asyncio.to_thread(
        cli.main, ["doctor", "--index-url", setup.base_url, "--model", "nope", "--prompt", "x"]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert "404" in err
    assert MODEL in err
    code = await asyncio.to_thread(
        cli.main, ["doctor", "--index-url", setup.base_url, "--model", MODEL, "--token-ids", "a"]
    )
    assert code == 2
    assert "--token-ids takes" in capsys.readouterr().err


async def test_cli_chat_messages_from_file(
    setup: Setup, capsys: pytest.CaptureFixture[str], tmp_path: Any
) -> None:
    messages = [{"role": "user", "content": TEXT}]
    ids = deepseek().apply_chat_template(messages, add_generation_prompt=False)
    store_prompt(setup.index, "10.0.0.1:8000", MODEL, ids)
    path = tmp_path / "messages.json"
    path.write_text(json.dumps(messages))
    argv = ["doctor", "--index-url", setup.base_url, "--model", MODEL]
    await asyncio.to_thread(
        cli.main, [*argv, "--messages-file", str(path), "--no-generation-prompt", "--json"]
    )
    report = json.loads(capsys.readouterr().out)
    assert report["prompt_tokens"] == len(ids)
    assert report["engines"][0]["matched_blocks"] == len(ids) // 16
    assert report["engines"][0]["stops_at"] is None
