"""kvindex for embedders: one object that ingests the engines' KV-event batches and scores
prompts against what they hold (docs/library.md).

An :class:`Indexer` is the service's pieces wired once from an :class:`IndexerConfig`: the
index from :func:`kvindex.index.make_index` (locked, as the services use it), an
:class:`~kvindex.ingest.EventApplier` for the write path, and for the read path the
tokenizer registry, a :class:`~kvindex.scoring.Scorer` (with speculative entries when
``speculative_ttl_s > 0``) and the :class:`~kvindex.service.score_api.ScoreService` that
resolves LoRA adapters, tokenizes and maps errors exactly as ``kvindex serve`` does::

    indexer = Indexer(IndexerConfig(tokenizers={"my-model": "/models/my-model"}))
    indexer.ingest("10.0.0.1:8000", payload, model="my-model")  # a vLLM batch payload
    indexer.score("my-model", "Hello")  # {"10.0.0.1:8000": 1.0}

The write path takes payloads as they arrive (the third frame of vLLM's / SGLang's ZMQ
messages) or batches decoded by :func:`kvindex.wire.decode_batch`; sequence numbers, gaps
and replay are the socket ingest's business (:class:`kvindex.ingest_service.IngestService`,
which can share :attr:`Indexer.index`). ``ingest`` may be called from one thread at a time
per Indexer (it serialises itself), ``score`` from any thread.

Errors: :class:`BatchDecodeError` for a payload that cannot be read, and
:class:`~kvindex.service.score_api.ScoreRequestError` (``kind``, ``reason``, message) for a
prompt that cannot be scored; both are :class:`kvindex.errors.KVIndexError`.
"""

from __future__ import annotations

import threading
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kvindex.errors import ConfigError, KVIndexError
from kvindex.index.base import BlockIndex
from kvindex.index.factory import IndexConfig, make_index, wrap_index
from kvindex.ingest import FULL_ATTENTION, EventApplier, IngestConfig, IngestCounts
from kvindex.keys import DEFAULT_BLOCK_SIZE
from kvindex.scoring import Scorer, ScoreResult, ScoringConfig, TierWeights
from kvindex.service.score_api import (
    ScoreMetrics,
    ScoreQuery,
    ScoreService,
    ScoreServiceConfig,
    TokenizerSource,
)
from kvindex.speculative import SpeculativeConfig, SpeculativeIndex
from kvindex.wire import DecodedBatch, decode_batch

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from kvindex.index.locked import LockedIndex
    from kvindex.index.redis import ClientSource

__all__ = ["BatchDecodeError", "Indexer", "IndexerConfig"]

API = "library"  # the `api` label of the score metrics for calls through an Indexer

Prompt = str | Sequence[int]


class BatchDecodeError(KVIndexError, ValueError):
    """A payload that is not a KV-event batch of any encoding kvindex reads."""


@dataclass(frozen=True, slots=True)
class IndexerConfig:
    """Everything an :class:`Indexer` needs. ``block_size`` is kvindex's canonical block size
    (any engine block size that is a multiple of it, or divides it, is indexed); the keys are
    rooted at the model and LoRA name, with no seed to configure (docs/keys.md)."""

    index: IndexConfig = field(default_factory=IndexConfig)
    block_size: int = DEFAULT_BLOCK_SIZE
    default_model: str = ""  # model of batches ingested without one
    indexed_kinds: frozenset[str] = frozenset({FULL_ATTENTION})  # KV-cache group kinds
    # model -> tokenizer (a tokenizer.json, a model directory, a Hugging Face id in the
    # local cache); without any, only token ids can be scored.
    tokenizers: Mapping[str, str] = field(default_factory=dict)
    lora_adapters: Mapping[str, str] = field(default_factory=dict)  # adapter -> base model
    weights: TierWeights = field(default_factory=TierWeights)
    max_prompt_tokens: int = 1 << 20
    speculative_ttl_s: float = 0.0  # > 0: record_pick adds entries living this long

    def ingest_config(self) -> IngestConfig:
        return IngestConfig(
            block_size=self.block_size,
            indexed_kinds=self.indexed_kinds,
            default_model=self.default_model,
        )


class Indexer:
    """Ingests KV-event batches and scores prompts (see the module docstring).

    ``registry``: where the index and score metrics go (none when omitted). ``index``: a
    :class:`BlockIndex` to use instead of building ``config.index`` (wrapped as
    :func:`~kvindex.index.make_index` wraps its own). ``tokenizers``: a tokenizer source to
    use instead of ``config.tokenizers``. ``redis_client``: see :func:`make_index`."""

    def __init__(
        self,
        config: IndexerConfig | None = None,
        *,
        registry: CollectorRegistry | None = None,
        index: BlockIndex | None = None,
        tokenizers: TokenizerSource | None = None,
        redis_client: ClientSource | None = None,
    ) -> None:
        self.config = config = config or IndexerConfig()
        if config.lora_adapters and not config.tokenizers and tokenizers is None:
            raise ConfigError("lora_adapters need the base model's tokenizer in tokenizers")
        self.index: LockedIndex = (
            wrap_index(index, registry=registry)
            if index is not None
            else make_index(config.index, registry=registry, redis_client=redis_client)
        )
        self._applier = EventApplier(self.index, config.ingest_config())
        self._ingest_lock = threading.Lock()
        if tokenizers is None and config.tokenizers:
            from kvindex.tokenize import TokenizerRegistry

            tokenizers = TokenizerRegistry(dict(config.tokenizers), dict(config.lora_adapters))
        self.tokenizers = tokenizers
        speculative = (
            SpeculativeIndex(SpeculativeConfig(ttl_s=config.speculative_ttl_s))
            if config.speculative_ttl_s > 0
            else None
        )
        self.scorer = Scorer(
            self.index,
            ScoringConfig(
                block_size=config.block_size,
                weights=config.weights,
                max_prompt_tokens=config.max_prompt_tokens,
            ),
            speculative,
            block_sizes=self._applier.block_sizes,
        )
        # The engines' events settle speculative entries (stored blocks, cleared caches).
        self._applier.speculative = speculative
        self.service = ScoreService(
            self.scorer, tokenizers, ScoreServiceConfig(), ScoreMetrics(registry)
        )

    def load_tokenizers(self) -> None:
        """Load every configured tokenizer now rather than on first use, so a bad path fails
        at start-up (raises ``kvindex.tokenize.TokenizerLoadError``)."""
        preload = getattr(self.tokenizers, "preload", None)
        if preload is not None:
            preload()

    # -- write path --------------------------------------------------------------------------

    def ingest(
        self, engine: str, batch: bytes | DecodedBatch, model: str | None = None
    ) -> IngestCounts:
        """Apply one batch of ``engine`` (the endpoint key requests are routed to,
        ``ip:port``) serving ``model`` (the base model; None: ``default_model``). Returns
        what it did (events by type, blocks stored / removed / skipped by reason). Raises
        BatchDecodeError for an undecodable payload, and what the index raises (the Redis
        backend: ``IndexUnavailable``)."""
        if not isinstance(batch, DecodedBatch):
            batch = decode_batch(batch)
        if batch.error is not None:
            raise BatchDecodeError(batch.error)
        with self._ingest_lock:
            return self._applier.apply_batch(engine, batch, model)

    def forget(self, engine: str) -> None:
        """Drop an engine that left (its blocks and its ingest state)."""
        with self._ingest_lock:
            self._applier.forget(engine)
            self.index.purge(engine)

    # -- read path ---------------------------------------------------------------------------

    def score(
        self,
        model: str,
        prompt: Prompt | None = None,
        *,
        messages: Sequence[Mapping[str, Any]] | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
        lora: str | None = None,
        cache_salt: str | None = None,
        engines: Collection[str] | None = None,
    ) -> dict[str, float]:
        """Engine -> score in [0, 1] (the tier-weighted share of the prompt's blocks the
        engine holds from the first one on; docs/scoring.md), best first: every engine
        holding the first block, or exactly ``engines`` when given. ``prompt`` is text
        (tokenized with the model's tokenizer) or token ids; or give chat ``messages``
        (with ``tools``), rendered with the model's chat template. Raises
        ScoreRequestError."""
        result = self.score_result(
            model,
            prompt,
            messages=messages,
            tools=tools,
            lora=lora,
            cache_salt=cache_salt,
            engines=engines,
        )
        return {s.engine: s.score for s in result.scores}

    def score_result(
        self,
        model: str,
        prompt: Prompt | None = None,
        *,
        messages: Sequence[Mapping[str, Any]] | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
        lora: str | None = None,
        cache_salt: str | None = None,
        engines: Collection[str] | None = None,
    ) -> ScoreResult:
        """As :meth:`score`, with the details: per engine the matched blocks by tier, the
        prompt's keys, block and token counts."""
        query = _query(model, prompt, messages, tools, lora, cache_salt, engines)
        return self.service.score(query, API)

    def record_pick(
        self,
        engine: str,
        model: str,
        prompt: Prompt,
        *,
        lora: str | None = None,
        cache_salt: str | None = None,
    ) -> int:
        """Note that the prompt was just routed to ``engine``: until its events arrive, its
        blocks count for ``engine`` (for ``speculative_ttl_s``; no-op, 0, when that is 0).
        Returns the blocks recorded."""
        query = _query(model, prompt, None, None, lora, cache_salt, None)
        return self.service.record_speculative(engine, query, API)

    def engines(self) -> list[str]:
        """Engines holding at least one block."""
        return self.index.engines()

    def close(self) -> None:
        """Release the index's connections (Redis)."""
        self.index.close()


def _query(
    model: str,
    prompt: Prompt | None,
    messages: Sequence[Mapping[str, Any]] | None,
    tools: Sequence[Mapping[str, Any]] | None,
    lora: str | None,
    cache_salt: str | None,
    engines: Collection[str] | None,
) -> ScoreQuery:
    text = prompt if isinstance(prompt, str) else None
    ids = None if prompt is None or isinstance(prompt, str) else prompt
    return ScoreQuery(
        model=model,
        token_ids=ids,
        prompt=text,
        messages=messages,
        tools=tools,
        lora=lora,
        cache_salt=cache_salt,
        engines=None if engines is None else list(engines),
    )
