"""Engine-backed tokenizer: asks a vLLM server for the exact ids (async, aiohttp).

Endpoints (vLLM OpenAI server):
- `POST /tokenize` with `{"model", "prompt", "add_special_tokens"}` or `{"model", "messages",
  "add_generation_prompt", "continue_final_message", "tools", "chat_template",
  "chat_template_kwargs"}` -> `{"count", "max_model_len", "tokens": [...]}`.
- `POST /v1/completions/render` with a completion request -> a list with one entry per
  prompt, each `{"token_ids": [...], ...}`.
- `POST /v1/chat/completions/render` with a chat completion request -> `{"token_ids": [...],
  ...}` (also served by the GPU-less `vllm launch render`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import aiohttp

from kvindex.tokenize.errors import ChatTemplateError, TokenizationError

EndpointStyle = Literal["tokenize", "render"]
_CHAT_TOP_LEVEL = ("chat_template", "continue_final_message", "documents", "add_special_tokens")


class EngineTokenizer:
    """Token ids from the engine itself. `style="tokenize"` uses /tokenize, `style="render"`
    the render endpoints. Pass a shared `session` or let this object own one (`close()`)."""

    def __init__(
        self,
        base_url: str,
        model: str,
        session: aiohttp.ClientSession | None = None,
        *,
        style: EndpointStyle = "tokenize",
        timeout_s: float = 10.0,
    ) -> None:
        if style not in ("tokenize", "render"):
            raise ValueError(f"style must be 'tokenize' or 'render', got {style!r}")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.style = style
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._timeout_s = timeout_s
        self._session = session
        self._owns_session = session is None

    async def __aenter__(self) -> EngineTokenizer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._owns_session and self._session is not None:
            await self._session.close()
            self._session = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        return self._session

    async def _post(self, path: str, body: Mapping[str, Any]) -> Any:
        url = self.base_url + path
        try:
            async with self._client().post(url, json=body, timeout=self._timeout) as resp:
                text = await resp.text()
                if resp.status >= 400:
                    raise _http_error(url, resp.status, text)
                try:
                    return await resp.json(content_type=None)
                except ValueError as exc:
                    raise TokenizationError(
                        f"engine at {url} answered {resp.status} with non-JSON: {text[:200]!r}"
                    ) from exc
        except TimeoutError as exc:
            raise TokenizationError(
                f"engine at {url} did not answer within {self._timeout_s:g}s; check that it is "
                "up or raise the timeout"
            ) from exc
        except aiohttp.ClientError as exc:
            raise TokenizationError(
                f"cannot reach engine at {url}: {type(exc).__name__}: {exc}; check --engine URL"
            ) from exc

    async def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if self.style == "tokenize":
            body = {"model": self.model, "prompt": text, "add_special_tokens": add_special_tokens}
            return _ids(await self._post("/tokenize", body), "tokens", "/tokenize")
        body = {
            "model": self.model,
            "prompt": text,
            "add_special_tokens": add_special_tokens,
            "max_tokens": 1,
        }
        data = await self._post("/v1/completions/render", body)
        if not isinstance(data, list) or len(data) != 1:
            raise TokenizationError(
                f"/v1/completions/render answered {type(data).__name__}, expected a one-item list"
            )
        return _ids(data[0], "token_ids", "/v1/completions/render")

    async def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
        **template_kwargs: Any,
    ) -> list[int]:
        kwargs = dict(template_kwargs)
        body: dict[str, Any] = {
            "model": self.model,
            "messages": [dict(m) for m in messages],
            "add_generation_prompt": add_generation_prompt,
        }
        for key in _CHAT_TOP_LEVEL:
            if key in kwargs:
                body[key] = kwargs.pop(key)
        if tools is not None:
            body["tools"] = [dict(t) for t in tools]
        if kwargs:
            body["chat_template_kwargs"] = kwargs
        if self.style == "tokenize":
            return _ids(await self._post("/tokenize", body), "tokens", "/tokenize")
        body["max_tokens"] = 1
        data = await self._post("/v1/chat/completions/render", body)
        return _ids(data, "token_ids", "/v1/chat/completions/render")


def _ids(data: Any, key: str, path: str) -> list[int]:
    ids = data.get(key) if isinstance(data, Mapping) else None
    if not isinstance(ids, list) or not all(isinstance(i, int) for i in ids):
        raise TokenizationError(f"{path} answer has no integer list {key!r}: {str(data)[:200]}")
    return [int(i) for i in ids]


def _http_error(url: str, status: int, text: str) -> TokenizationError:
    message = text[:300]
    try:
        data = json.loads(text)
        if isinstance(data, Mapping):
            inner = data.get("error", data)
            if isinstance(inner, Mapping) and isinstance(inner.get("message"), str):
                message = inner["message"]
            elif isinstance(data.get("message"), str):
                message = data["message"]
    except ValueError:
        pass
    cls = ChatTemplateError if "template" in message.lower() else TokenizationError
    return cls(f"engine at {url} answered HTTP {status}: {message}")
