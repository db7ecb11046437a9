"""The root of kvindex's exceptions.

Every error kvindex raises on purpose derives from :class:`KVIndexError`, and keeps the
builtin base it had before (``ValueError`` for bad input such as :class:`ConfigError`,
``kvindex.scoring.ScoringError`` or ``kvindex.wire.FrameError``), so ``except KVIndexError``
catches the library's refusals while ``except ValueError`` code keeps working. Errors of the
libraries underneath (redis-py, msgspec, tokenizers) are mapped at kvindex's edges: the Redis
index raises :class:`kvindex.index.redis.IndexUnavailable`, the read path
``kvindex.service.score_api.ScoreRequestError``, the tokenizers
``kvindex.tokenize.TokenizationError``.
"""

from __future__ import annotations

__all__ = ["ConfigError", "EngineLimitError", "KVIndexError"]


class KVIndexError(Exception):
    """Base class of every exception kvindex raises on purpose."""


class ConfigError(KVIndexError, ValueError):
    """A configuration that cannot be used; the message says where and how to fix it."""


class EngineLimitError(KVIndexError, OverflowError):
    """An index asked to hold more engines than it has slots for (the C index's 65,536;
    ``kvindex.engines.MAX_ENGINES_LIMIT``). Purged engines free their slots; the ingest's
    ``max_engines`` keeps a service below the limit."""
