"""/v1/score with the project's real tokenizer registry (kvindex.tokenize) behind the read
API's protocols: exact ids for prompts and chats, LoRA adapter names, and its errors mapped
to statuses."""

from __future__ import annotations

import json
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from score_fixtures import CHAT_TEMPLATE, DEEPSEEK_DIR, store_prompt

from kvindex.index import MemoryIndex
from kvindex.scoring import Scorer
from kvindex.service.score_api import ScoreService
from kvindex.service.score_http import add_score_routes
from kvindex.tokenize import TokenizerRegistry

MODEL = "deepseek-ai/DeepSeek-V3"
PLAIN = "deepseek-plain"  # the same tokenizer without a chat template
ADAPTER = "finance-lora"
TEXT = "Quarterly revenue grew in every region, led by the cloud segment. " * 25


def tokenizer_dir(root: Path, chat_template: str | None) -> Path:
    root.mkdir()
    shutil.copy(DEEPSEEK_DIR / "tokenizer.json", root / "tokenizer.json")
    config = json.loads((DEEPSEEK_DIR / "tokenizer_config.json").read_text())
    if chat_template is not None:
        config["chat_template"] = chat_template
    (root / "tokenizer_config.json").write_text(json.dumps(config))
    return root


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[TestClient[Any, Any], Any, Any]]:
    registry = TokenizerRegistry(
        {
            MODEL: tokenizer_dir(tmp_path / "chat", CHAT_TEMPLATE),
            PLAIN: tokenizer_dir(tmp_path / "plain", None),
            "missing/model": tmp_path / "does-not-exist",
        },
        {ADAPTER: MODEL},
    )
    index = MemoryIndex()
    app = web.Application()
    add_score_routes(app, ScoreService(Scorer(index), registry))
    client = TestClient(TestServer(app, host="127.0.0.1", port=0))
    await client.start_server()
    try:
        yield client, index, registry
    finally:
        await client.close()


async def test_prompt_and_chat_through_the_registry(served: Any) -> None:
    client, index, registry = served
    tok = registry.get(MODEL)
    prompt_ids = tok.encode(TEXT)
    store_prompt(index, "10.0.0.1:8000", MODEL, prompt_ids)
    messages = [{"role": "system", "content": TEXT}, {"role": "user", "content": "Risks?"}]
    chat_ids = tok.apply_chat_template(messages)
    store_prompt(index, "10.0.0.2:8000", MODEL, chat_ids, lora=ADAPTER, salt="acme")

    response = await client.post("/v1/score", json={"model": MODEL, "prompt": TEXT})
    body = await response.json()
    assert response.status == 200
    assert [(s["engine"], s["matched_blocks"]) for s in body["scores"]] == [
        ("10.0.0.1:8000", len(prompt_ids) // 16)
    ]
    response = await client.post(
        "/v1/score", json={"model": ADAPTER, "messages": messages, "cache_salt": "acme"}
    )
    body = await response.json()
    assert response.status == 200
    assert (body["model"], body["lora"]) == (MODEL, ADAPTER)
    assert [(s["engine"], s["matched_blocks"]) for s in body["scores"]] == [
        ("10.0.0.2:8000", len(chat_ids) // 16)
    ]


@pytest.mark.parametrize(
    ("body", "status", "reason", "mentions"),
    [
        ({"model": "nobody", "prompt": "x"}, 404, "unknown_model", MODEL),
        ({"model": "missing/model", "prompt": "x"}, 424, "no_tokenizer", "missing/model"),
        (
            {"model": PLAIN, "messages": [{"role": "user", "content": "x"}]},
            422,
            "untokenizable",
            "chat template",
        ),
    ],
)
async def test_registry_errors(
    served: Any, body: dict[str, Any], status: int, reason: str, mentions: str
) -> None:
    client, _, _ = served
    response = await client.post("/v1/score", json=body)
    data = await response.json()
    assert response.status == status, data
    assert data["error"]["reason"] == reason
    assert mentions in data["error"]["message"]
