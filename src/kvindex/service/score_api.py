"""The read API shared by the HTTP and gRPC edges: one normalised request (:class:`ScoreQuery`),
model resolution, tokenization, scoring, speculative records, metrics and error classes.

The edges only decode their wire format into a :class:`ScoreQuery`, call
:meth:`ScoreService.score` (synchronous: tokenizing and index lookups block, so edges call it
through a worker thread) and map a :class:`ScoreRequestError` to their status codes with
:data:`HTTP_STATUS` / the gRPC table in :mod:`kvindex.service.grpc_server`.

Tokenizers are reached through :class:`TokenizerSource` (model -> base model and a
:class:`kvindex.tokenize.Tokenizer`, the one tokenizer protocol, imported for type checking
only); ``kvindex.tokenize.TokenizerRegistry`` satisfies it. Errors raised by a tokenizer
source are classified by class name (``UnknownModelError``, ``TokenizerLoadError``,
``ChatTemplateError``, ``TokenizationError``) so this module does not load the tokenize
package at run time.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from prometheus_client import CollectorRegistry, Counter, Histogram

from kvindex.errors import KVIndexError
from kvindex.scoring import Scorer, ScoreResult, ScoringError

if TYPE_CHECKING:
    # Not at run time: importing the tokenize package loads tokenizers, jinja2 and aiohttp.
    from kvindex.tokenize.protocol import Tokenizer

_T = TypeVar("_T")
_log = logging.getLogger(__name__)

__all__ = [
    "HTTP_STATUS",
    "ErrorKind",
    "ScoreMetrics",
    "ScoreQuery",
    "ScoreRequestError",
    "ScoreService",
    "ScoreServiceConfig",
    "Tokenized",
    "TokenizerSource",
]


class TokenizerSource(Protocol):
    """Model name (base model or LoRA adapter) -> base model and tokenizer."""

    def resolve(self, model: str) -> str:
        """The base model of ``model`` (itself for a base model)."""
        ...

    def get(self, model: str) -> Tokenizer: ...


class ErrorKind(Enum):
    INVALID = "invalid_request"
    UNKNOWN_MODEL = "unknown_model"
    NO_TOKENIZER = "no_tokenizer"
    UNTOKENIZABLE = "untokenizable"
    TOO_LARGE = "prompt_too_large"
    UNAUTHORIZED = "unauthorized"
    INTERNAL = "internal_error"


HTTP_STATUS: dict[ErrorKind, int] = {
    ErrorKind.INVALID: 400,
    ErrorKind.UNKNOWN_MODEL: 404,
    ErrorKind.NO_TOKENIZER: 424,
    ErrorKind.UNTOKENIZABLE: 422,
    ErrorKind.TOO_LARGE: 413,
    ErrorKind.UNAUTHORIZED: 401,
    ErrorKind.INTERNAL: 500,
}


class ScoreRequestError(KVIndexError):
    """A request that cannot be served; ``kind`` picks the status, ``reason`` is a short label
    (the metric label), the message says what was wrong and how to fix it."""

    def __init__(self, kind: ErrorKind, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.reason = reason or kind.value
        self.message = message


# Tokenizer-source errors by class name, most specific first (see the module docstring).
_TOKENIZER_ERRORS: tuple[tuple[str, ErrorKind], ...] = (
    ("UnknownModelError", ErrorKind.UNKNOWN_MODEL),
    ("TokenizerLoadError", ErrorKind.NO_TOKENIZER),
    ("ChatTemplateError", ErrorKind.UNTOKENIZABLE),
    ("TokenizationError", ErrorKind.UNTOKENIZABLE),
)


def _classify_tokenizer_error(exc: Exception) -> ErrorKind | None:
    names = {cls.__name__ for cls in type(exc).__mro__}
    for name, kind in _TOKENIZER_ERRORS:
        if name in names:
            return kind
    return None


@dataclass(slots=True)
class ScoreQuery:
    """One score (or speculative, or debug) request, whatever edge it came from. Exactly one
    of ``token_ids``, ``prompt``, ``messages`` is set."""

    model: str
    token_ids: Sequence[int] | None = None
    prompt: str | None = None
    messages: Sequence[Mapping[str, Any]] | None = None
    tools: Sequence[Mapping[str, Any]] | None = None
    add_generation_prompt: bool = True
    add_special_tokens: bool = True
    lora: str | None = None
    cache_salt: str | None = None
    engines: Sequence[str] | None = None

    def validate(self) -> None:
        if not self.model:
            raise ScoreRequestError(ErrorKind.INVALID, "'model' is required", "missing_model")
        given = [
            name
            for name, value in (
                ("token_ids", self.token_ids),
                ("prompt", self.prompt),
                ("messages", self.messages),
            )
            if value is not None
        ]
        if len(given) != 1:
            raise ScoreRequestError(
                ErrorKind.INVALID,
                "give exactly one of 'token_ids', 'prompt' or 'messages'"
                + (f" (got {', '.join(given)})" if given else ""),
                "prompt_shape",
            )

    @property
    def input_kind(self) -> str:
        if self.token_ids is not None:
            return "tokens"
        return "prompt" if self.prompt is not None else "chat"


@dataclass(frozen=True, slots=True)
class Tokenized:
    model: str  # base model
    lora: str | None
    token_ids: Sequence[int]


@dataclass(frozen=True, slots=True)
class ScoreServiceConfig:
    # Text prompts longer than this (characters, summed over chat messages) are refused
    # before tokenizing; token limits are ScoringConfig.max_prompt_tokens.
    max_prompt_chars: int = 4 << 20
    # Models accepted for token-id requests when no tokenizer source is configured; None:
    # any model name.
    models: Collection[str] | None = None


class ScoreMetrics:
    """Read-path metrics, registered on the service's registry (or a private one)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        registry = registry if registry is not None else CollectorRegistry()
        self.registry = registry
        self.requests = Counter(
            "kvindex_score_requests",
            "Read API requests by edge, method and outcome (ok or an error reason).",
            ["api", "method", "outcome"],
            registry=registry,
        )
        self.errors = Counter(
            "kvindex_score_errors",
            "Read API requests refused, by edge and reason.",
            ["api", "reason"],
            registry=registry,
        )
        self.duration = Histogram(
            "kvindex_score_duration_seconds",
            "Time to answer a score request (tokenize + lookup), by input kind.",
            ["input"],
            buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 1.0),
            registry=registry,
        )
        self.speculative_blocks = Counter(
            "kvindex_speculative_recorded_blocks",
            "Blocks recorded as speculative entries.",
            registry=registry,
        )

    def ok(self, api: str, method: str) -> None:
        self.requests.labels(api, method, "ok").inc()

    def error(self, api: str, method: str, reason: str) -> None:
        self.requests.labels(api, method, reason).inc()
        self.errors.labels(api, reason).inc()


@dataclass(slots=True)
class ScoreService:
    """Resolves, tokenizes and scores requests for every edge."""

    scorer: Scorer
    tokenizers: TokenizerSource | None = None
    config: ScoreServiceConfig = field(default_factory=ScoreServiceConfig)
    metrics: ScoreMetrics = field(default_factory=ScoreMetrics)
    # Whether the service vouches for an engine (discovered, or sending events it accepted):
    # speculative entries and /v1/debug's engine fetches are refused for any other.
    # None: every engine (an embedder without ingest).
    engine_known: Callable[[str], bool] | None = None

    # The bearer token the write and debug methods (speculative entries, /v1/debug) require;
    # None: they are open (docs/security.md).
    write_token: str | None = None

    def authorize(self, presented: str | None, api: str, method: str) -> None:
        """Refuse (401 / UNAUTHENTICATED, counted) a write or debug call without the token.
        ``presented``: the ``Authorization`` header or metadata value as received."""
        if self.write_token is None:
            return
        token = presented[7:].strip() if presented and presented[:7].lower() == "bearer " else ""
        if not hmac.compare_digest(token.encode(), self.write_token.encode()):
            self.metrics.error(api, method, "unauthorized")
            raise ScoreRequestError(
                ErrorKind.UNAUTHORIZED,
                f"{method} needs 'Authorization: Bearer <token>' (the index's --api-token-file)",
                "unauthorized",
            )

    def knows(self, engine: str) -> bool:
        return self.engine_known is None or self.engine_known(engine)

    # -- model and tokens --------------------------------------------------------------------

    def resolve(self, model: str, lora: str | None) -> tuple[str, str | None]:
        """(base model, LoRA adapter) of a request: a model name that is an adapter resolves
        to its base model with that adapter."""
        if self.tokenizers is not None:
            source = self.tokenizers
            base = self._call_tokenizers(lambda: source.resolve(model))
        else:
            models = self.config.models
            if models is not None and model not in models:
                names = ", ".join(sorted(models)) or "(none)"
                raise ScoreRequestError(
                    ErrorKind.UNKNOWN_MODEL,
                    f"unknown model {model!r}; configured models: {names}",
                )
            base = model
        adapter = model if base != model else None
        if lora and adapter and lora != adapter:
            raise ScoreRequestError(
                ErrorKind.INVALID,
                f"model {model!r} is LoRA adapter {adapter!r} of {base!r}, but 'lora' says "
                f"{lora!r}; give one of them",
                "lora_conflict",
            )
        return base, lora or adapter

    def tokenize(self, query: ScoreQuery) -> Tokenized:
        query.validate()
        base, lora = self.resolve(query.model, query.lora)
        if query.token_ids is not None:
            return Tokenized(base, lora, query.token_ids)
        self._check_size(query)
        if self.tokenizers is None:
            raise ScoreRequestError(
                ErrorKind.NO_TOKENIZER,
                "this service has no tokenizers configured, so it scores only 'token_ids'; "
                "start it with --tokenizer MODEL=PATH_OR_HUB_ID to accept text and chats",
            )
        source = self.tokenizers
        tokenizer = self._call_tokenizers(lambda: source.get(query.model))
        if query.prompt is not None:
            text = query.prompt
            ids = self._call_tokenizers(lambda: tokenizer.encode(text, query.add_special_tokens))
        else:
            messages = query.messages or ()
            ids = self._call_tokenizers(
                lambda: tokenizer.apply_chat_template(
                    messages, add_generation_prompt=query.add_generation_prompt, tools=query.tools
                )
            )
        return Tokenized(base, lora, ids)

    # -- operations --------------------------------------------------------------------------

    def score(self, query: ScoreQuery, api: str, method: str = "score") -> ScoreResult:
        """Score one request; every outcome is counted under ``api`` / ``method``."""
        return self.score_detailed(query, api, method)[1]

    def score_detailed(
        self, query: ScoreQuery, api: str, method: str = "score"
    ) -> tuple[Tokenized, ScoreResult]:
        """As :meth:`score`, also returning the resolved model and the prompt's token ids."""
        started = time.perf_counter()
        try:
            tokens = self.tokenize(query)
            result = self._scoring(
                lambda: self.scorer.score_tokens(
                    tokens.model, tokens.token_ids, tokens.lora, query.cache_salt, query.engines
                )
            )
        except ScoreRequestError as exc:
            self.metrics.error(api, method, exc.reason)
            raise
        except Exception as exc:
            raise self._internal(exc, api, method) from exc
        self.metrics.duration.labels(query.input_kind).observe(time.perf_counter() - started)
        self.metrics.ok(api, method)
        return tokens, result

    def record_speculative(self, engine: str, query: ScoreQuery, api: str) -> int:
        """Record that ``engine`` was just sent this prompt; returns the blocks recorded."""
        try:
            if not engine:
                raise ScoreRequestError(ErrorKind.INVALID, "'engine' is required", "missing_engine")
            if not self.knows(engine):
                raise ScoreRequestError(
                    ErrorKind.INVALID,
                    f"unknown engine {engine[:120]!r}: speculative entries are accepted only "
                    "for engines the index knows (discovered or publishing KV events)",
                    "unknown_engine",
                )
            tokens = self.tokenize(query)
            n = self._scoring(
                lambda: self.scorer.record_speculative(
                    engine, tokens.model, tokens.token_ids, tokens.lora, query.cache_salt
                )
            )
        except ScoreRequestError as exc:
            self.metrics.error(api, "speculative", exc.reason)
            raise
        except Exception as exc:
            raise self._internal(exc, api, "speculative") from exc
        self.metrics.speculative_blocks.inc(n)
        self.metrics.ok(api, "speculative")
        return n

    # -- helpers -----------------------------------------------------------------------------

    def _internal(self, exc: Exception, api: str, method: str) -> ScoreRequestError:
        """A bug or a backend failure (e.g. Redis down): logged with its traceback, counted,
        answered as 500 / INTERNAL instead of an unhandled exception."""
        _log.exception("%s %s failed", api, method)
        self.metrics.error(api, method, ErrorKind.INTERNAL.value)
        return ScoreRequestError(ErrorKind.INTERNAL, f"internal error: {type(exc).__name__}: {exc}")

    def _check_size(self, query: ScoreQuery) -> None:
        limit = self.config.max_prompt_chars
        if query.prompt is not None:
            size = len(query.prompt)
        else:
            size = sum(len(str(m.get("content") or "")) for m in query.messages or ())
        if size > limit:
            raise ScoreRequestError(
                ErrorKind.TOO_LARGE,
                f"prompt has {size} characters, more than the limit of {limit}",
                "prompt_too_long",
            )

    def _call_tokenizers(self, call: Callable[[], _T]) -> _T:
        try:
            return call()
        except ScoreRequestError:
            raise
        except Exception as exc:
            kind = _classify_tokenizer_error(exc)
            if kind is None:
                raise
            raise ScoreRequestError(kind, str(exc)) from exc

    @staticmethod
    def _scoring(call: Callable[[], _T]) -> _T:
        try:
            return call()
        except ScoringError as exc:
            kind = ErrorKind.TOO_LARGE if exc.reason == "prompt_too_long" else ErrorKind.INVALID
            raise ScoreRequestError(kind, str(exc), exc.reason) from exc
