"""Prefix scoring: which engines already hold how much of a prompt's KV cache. Pure, no I/O.

A prompt's content keys are computed with the same function the event side uses
(:func:`kvindex.keys.chain_keys`, rooted at ``root_key(model, lora)``, the cache salt in the
first block's :class:`~kvindex.keys.BlockExtra`), looked up in a :class:`BlockIndex`, and
optionally extended with speculative entries. Per engine:

* ``matched_blocks``: consecutive blocks from the first one the engine holds, in any tier
  (real blocks first, then speculative ones continuing the real match);
* ``weighted``: ``gpu * w_gpu + cpu * w_cpu + storage * w_storage + speculative * w_spec``
  over those matched blocks (each block counted once, in its best tier);
* ``score``: ``weighted / total_blocks`` where ``total_blocks`` is the number of full
  canonical blocks of the prompt (0 when the prompt has no full block), in [0, 1] as long as
  every weight is in [0, 1].

Results are sorted by score, then matched blocks (both descending), then engine name.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field

from kvindex.engine_blocks import EngineBlockSizes
from kvindex.errors import KVIndexError
from kvindex.index.base import BlockIndex, PrefixMatch
from kvindex.keys import (
    DEFAULT_BLOCK_SIZE,
    BlockExtra,
    ContentKey,
    chain_keys,
    prefix_chain_keys,
    root_key,
)
from kvindex.speculative import SpeculativeIndex

__all__ = [
    "DEFAULT_TIER_WEIGHTS",
    "EngineScore",
    "InvalidPromptError",
    "PromptTooLongError",
    "ScoreResult",
    "Scorer",
    "ScoringConfig",
    "ScoringError",
    "TierWeights",
    "prompt_keys",
]


class ScoringError(KVIndexError, ValueError):
    """A prompt that cannot be scored; ``reason`` is a short machine-readable label."""

    reason = "invalid_prompt"


class InvalidPromptError(ScoringError):
    reason = "invalid_token_id"


class PromptTooLongError(ScoringError):
    reason = "prompt_too_long"

    def __init__(self, tokens: int, limit: int) -> None:
        super().__init__(f"prompt has {tokens} tokens, more than the limit of {limit}")
        self.tokens = tokens
        self.limit = limit


@dataclass(frozen=True, slots=True)
class TierWeights:
    """Weight of one matched block by the tier it is held in (llm-d: gpu 1.0, cpu 0.8).

    These field defaults are the only place the default weights are written: the service
    builds ``TierWeights(**config.tier_weights)`` (absent tiers keep them), and the picker's
    precise-prefix scorer reads them from :data:`DEFAULT_TIER_WEIGHTS`."""

    gpu: float = 1.0
    cpu: float = 0.8
    storage: float = 0.5

    def __post_init__(self) -> None:
        for name in ("gpu", "cpu", "storage"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"tier weight {name} must be in [0, 1], got {value}")

    def as_tuple(self) -> tuple[float, float, float]:
        return (self.gpu, self.cpu, self.storage)


DEFAULT_TIER_WEIGHTS = TierWeights()


@dataclass(frozen=True, slots=True)
class ScoringConfig:
    block_size: int = DEFAULT_BLOCK_SIZE  # canonical block size; must equal IngestConfig's
    weights: TierWeights = field(default_factory=TierWeights)
    max_prompt_tokens: int = 1 << 20  # larger prompts are refused (PromptTooLongError)
    # vLLM never reuses the block holding a prompt's last token (it computes that token's
    # logits): scores leave that block out. False scores every cached block.
    last_token_recomputed: bool = True

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.max_prompt_tokens < 1:
            raise ValueError(f"max_prompt_tokens must be >= 1, got {self.max_prompt_tokens}")


@dataclass(frozen=True, slots=True)
class EngineScore:
    engine: str
    matched_blocks: int  # real + speculative, consecutive from the first block
    score: float  # weighted / total_blocks
    weighted: float  # tier-weighted matched blocks
    by_tier: tuple[int, int, int] = (0, 0, 0)  # real matched blocks by best tier
    speculative_blocks: int = 0  # blocks past the real match counted from speculative entries


@dataclass(frozen=True, slots=True)
class ScoreResult:
    model: str  # base model
    lora: str | None
    block_size: int
    total_blocks: int
    scores: tuple[EngineScore, ...]  # best first
    keys: tuple[ContentKey, ...] = ()
    prompt_tokens: int = 0

    def best(self) -> EngineScore | None:
        return self.scores[0] if self.scores and self.scores[0].matched_blocks else None


def prompt_keys(
    model: str,
    token_ids: Sequence[int],
    lora: str | None = None,
    cache_salt: str | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> list[ContentKey]:
    """Content keys of a prompt's full blocks, exactly as the event side computes them for the
    blocks an engine stores for this prompt. Raises InvalidPromptError for token ids outside
    [0, 2**32)."""
    extras = [BlockExtra(cache_salt=cache_salt)] if cache_salt is not None else None
    try:
        if extras is None:
            return prefix_chain_keys(root_key(model, lora), token_ids, block_size)
        return chain_keys(root_key(model, lora), token_ids, block_size, extras)
    except (OverflowError, TypeError) as exc:
        raise InvalidPromptError(f"token ids must be integers in [0, 2**32): {exc}") from exc


# Engines whose zero score is kept for reuse (more: the cache is cleared and refilled).
_ZERO_SCORES_MAX = 4096


def _untrusted(
    matches: dict[str, PrefixMatch], factors: Mapping[str, float]
) -> dict[str, PrefixMatch]:
    """Matches with the entries of untrusted engines withheld (factor 0) or scaled."""
    out: dict[str, PrefixMatch] = {}
    for engine, match in matches.items():
        factor = factors.get(engine)
        if factor is None:
            out[engine] = match
        elif factor > 0:
            out[engine] = _Scaled(match.blocks, match.by_tier, factor)
    return out


class _Scaled(PrefixMatch):
    """A match whose tier-weighted score is multiplied by ``factor`` (down-weighted)."""

    __slots__ = ("factor",)

    def __init__(self, blocks: int, by_tier: list[int], factor: float) -> None:
        super().__init__(blocks, by_tier)
        self.factor = factor


def _sort_key(score: EngineScore) -> tuple[float, int, str]:
    return (-score.score, -score.matched_blocks, score.engine)


class Scorer:
    """Scores engines for prompts against one index (and optional speculative entries)."""

    def __init__(
        self,
        index: BlockIndex,
        config: ScoringConfig | None = None,
        speculative: SpeculativeIndex | None = None,
        block_sizes: EngineBlockSizes | None = None,
    ) -> None:
        """``block_sizes``: each engine's block size as ingest learnt it (share the
        EventApplier's); without it every engine is taken to use the canonical size."""
        self.index = index
        self.config = config or ScoringConfig()
        self.speculative = speculative
        self.block_sizes = block_sizes or EngineBlockSizes(self.config.block_size)
        self._weights = self.config.weights.as_tuple()
        self._zero_scores: dict[str, EngineScore] = {}  # engine -> its no-match score
        # Engines whose index entries are not trusted (kvindex.sync: unsynced, replaying) ->
        # the factor their real matches count with (0: withheld). Set by the ingest owner.
        self.engine_factors: Callable[[], Mapping[str, float]] | None = None

    @property
    def block_size(self) -> int:
        return self.config.block_size

    def keys(
        self,
        model: str,
        token_ids: Sequence[int],
        lora: str | None = None,
        cache_salt: str | None = None,
    ) -> list[ContentKey]:
        limit = self.config.max_prompt_tokens
        if len(token_ids) > limit:
            raise PromptTooLongError(len(token_ids), limit)
        return prompt_keys(model, token_ids, lora, cache_salt, self.config.block_size)

    def score_tokens(
        self,
        model: str,
        token_ids: Sequence[int],
        lora: str | None = None,
        cache_salt: str | None = None,
        engines: Collection[str] | None = None,
    ) -> ScoreResult:
        """Score every engine (or only ``engines``, each listed even with no match)."""
        keys = self.keys(model, token_ids, lora, cache_salt)
        scores = self.score_keys(keys, engines, len(token_ids))
        return ScoreResult(
            model=model,
            lora=lora,
            block_size=self.config.block_size,
            total_blocks=len(keys),
            scores=scores,
            keys=tuple(keys),
            prompt_tokens=len(token_ids),
        )

    def score_keys(
        self,
        keys: Sequence[ContentKey],
        engines: Collection[str] | None = None,
        prompt_tokens: int | None = None,
    ) -> tuple[EngineScore, ...]:
        """Scores of the prompt whose block keys are ``keys``; ``prompt_tokens`` (its length)
        lets scores leave out the block of the last token; None: the prompt goes on past the
        keys. Matches count whole blocks of each engine's own size only."""
        if not self.config.last_token_recomputed:
            prompt_tokens = None
        reusable = self.block_sizes.reusable
        candidates = None if engines is None else set(engines)
        matches: dict[str, PrefixMatch] = self.index.lookup(keys, candidates) if keys else {}
        factors = self.engine_factors() if self.engine_factors is not None else None
        if factors and matches:
            matches = _untrusted(matches, factors)
        spec = self.speculative
        extra: dict[str, int] = {}
        if spec is not None and keys and len(spec):
            others = spec.engines() if candidates is None else candidates
            for engine in others:
                match = matches.get(engine)
                start = match.blocks if match is not None else 0
                if start >= len(keys):
                    continue
                n = spec.extend(engine, keys, start)
                if n:
                    extra[engine] = n
                if start and spec.holds(engine, keys[start - 1]):
                    # The engine really holds these now; their speculative twins are moot.
                    spec.forget(engine, keys[:start])
        total = len(keys)
        w_gpu, w_cpu, w_storage = self._weights
        w_spec = spec.config.weight if spec is not None else 0.0
        out: list[EngineScore] = []
        unmatched: list[str] = []
        for engine in set(matches) | set(extra):
            match = matches.get(engine)
            gpu, cpu, storage = match.by_tier if match is not None else (0, 0, 0)
            n_spec = extra.get(engine, 0)
            blocks = gpu + cpu + storage + n_spec
            usable = reusable(engine, blocks, prompt_tokens) if blocks else 0
            if not usable:
                unmatched.append(engine)
                continue
            if usable < blocks:
                # The blocks left out are the match's tail: speculative ones first, then the
                # real ones of the lowest tiers (a tier's blocks follow better tiers' blocks
                # when an engine offloads its coldest tail).
                cut = blocks - usable
                n_spec, cut = max(n_spec - cut, 0), max(cut - n_spec, 0)
                storage, cut = max(storage - cut, 0), max(cut - storage, 0)
                cpu, cut = max(cpu - cut, 0), max(cut - cpu, 0)
                gpu -= cut
                blocks = usable
            weighted = gpu * w_gpu + cpu * w_cpu + storage * w_storage
            if isinstance(match, _Scaled):
                weighted *= match.factor
            weighted += n_spec * w_spec
            out.append(
                EngineScore(
                    engine=engine,
                    matched_blocks=blocks,
                    score=weighted / total if total else 0.0,
                    weighted=weighted,
                    by_tier=(gpu, cpu, storage),
                    speculative_blocks=n_spec,
                )
            )
        out.sort(key=_sort_key)
        if candidates is not None:
            unmatched.extend(candidates.difference(matches, extra))
        if unmatched:
            # Engines without a matched block go after every matched one (whose score is
            # >= 0 with more blocks, so first in _sort_key's order), by name as _sort_key
            # orders them. Their (immutable, all-zero) scores are reused across calls.
            out.extend(self._unmatched(engine) for engine in sorted(unmatched))
        return tuple(out)

    def _unmatched(self, engine: str) -> EngineScore:
        score = self._zero_scores.get(engine)
        if score is None:
            if len(self._zero_scores) >= _ZERO_SCORES_MAX:
                self._zero_scores.clear()  # a churning pool: start over, stay bounded
            score = self._zero_scores[engine] = EngineScore(engine, 0, 0.0, 0.0)
        return score

    def record_speculative(
        self,
        engine: str,
        model: str,
        token_ids: Sequence[int],
        lora: str | None = None,
        cache_salt: str | None = None,
    ) -> int:
        """Record that ``engine`` was just sent this prompt; returns the blocks recorded (0
        when speculative entries are disabled). Only the blocks past what the engine already
        holds: those it holds are real entries, and a twin of one would outlive its eviction
        (a speculative run only ever extends the real match, so it starts where that ends)."""
        if self.speculative is None:
            return 0
        keys = self.keys(model, token_ids, lora, cache_salt)
        held = self.index.lookup(keys, (engine,)).get(engine) if keys else None
        return self.speculative.record(engine, keys[held.blocks :] if held else keys)
