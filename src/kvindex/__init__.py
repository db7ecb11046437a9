"""kvindex: a precise KV-cache block index fed by vLLM / SGLang KV-event streams.

The public API, for embedding kvindex in a program (docs/library.md)::

    import kvindex

    indexer = kvindex.Indexer(kvindex.IndexerConfig(tokenizers={"m": "/models/m"}))
    indexer.ingest("10.0.0.1:8000", payload, model="m")   # a KV-event batch payload
    indexer.score("m", "a prompt")                          # {"10.0.0.1:8000": 0.75}

Everything else (``kvindex.index``, ``kvindex.ingest_service``, ``kvindex.service``, ...) is
importable too, but these names are the ones kept stable. They load on first use, so
``import kvindex`` stays cheap.
"""

from __future__ import annotations

import importlib

from kvindex.errors import ConfigError, KVIndexError

TYPE_CHECKING = False  # not typing's: importing typing would double this module's cost
if TYPE_CHECKING:
    from kvindex.index.factory import IndexConfig, make_index
    from kvindex.index.redis import IndexUnavailable
    from kvindex.indexer import BatchDecodeError, Indexer, IndexerConfig
    from kvindex.keys import BlockExtra, chain_keys, root_key
    from kvindex.scoring import ScoringError, TierWeights, prompt_keys
    from kvindex.service.score_api import ScoreRequestError
    from kvindex.tokenize.errors import TokenizationError
    from kvindex.wire import decode_batch

__version__ = "0.1.0"

__all__ = [
    "BatchDecodeError",
    "BlockExtra",
    "ConfigError",
    "IndexConfig",
    "IndexUnavailable",
    "Indexer",
    "IndexerConfig",
    "KVIndexError",
    "ScoreRequestError",
    "ScoringError",
    "TierWeights",
    "TokenizationError",
    "__version__",
    "chain_keys",
    "decode_batch",
    "make_index",
    "prompt_keys",
    "root_key",
]

# name -> the module defining it, imported on first access (PEP 562).
_LAZY: dict[str, str] = {
    "BatchDecodeError": "kvindex.indexer",
    "BlockExtra": "kvindex.keys",
    "IndexConfig": "kvindex.index.factory",
    "IndexUnavailable": "kvindex.index.redis",
    "Indexer": "kvindex.indexer",
    "IndexerConfig": "kvindex.indexer",
    "ScoreRequestError": "kvindex.service.score_api",
    "ScoringError": "kvindex.scoring",
    "TierWeights": "kvindex.scoring",
    "TokenizationError": "kvindex.tokenize.errors",
    "chain_keys": "kvindex.keys",
    "decode_batch": "kvindex.wire",
    "make_index": "kvindex.index.factory",
    "prompt_keys": "kvindex.scoring",
    "root_key": "kvindex.keys",
}


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'kvindex' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later accesses skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
