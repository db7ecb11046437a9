"""`kvindex`'s public API: the names at the top of the package are pinned (adding or removing
one is a decision, made here), each resolves, and `import kvindex` alone stays cheap. (Not
named test_public_api.py: tests/epp has one, and these test directories are not packages.)"""

from __future__ import annotations

import subprocess
import sys

import pytest

import kvindex

PUBLIC = [
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

ERRORS = [
    "BatchDecodeError",
    "ConfigError",
    "IndexUnavailable",
    "ScoreRequestError",
    "ScoringError",
    "TokenizationError",
]


def test_all_is_pinned_and_sorted() -> None:
    assert kvindex.__all__ == PUBLIC
    assert sorted(PUBLIC) == PUBLIC


@pytest.mark.parametrize("name", PUBLIC)
def test_each_name_resolves(name: str) -> None:
    value = getattr(kvindex, name)
    assert value is not None
    assert name in dir(kvindex)
    if name != "__version__":
        # The object itself, from the module that defines it (not a copy or a wrapper).
        assert value.__module__.startswith("kvindex.")
        assert getattr(sys.modules[value.__module__], name) is value


@pytest.mark.parametrize("name", ERRORS)
def test_every_exported_error_has_the_one_root(name: str) -> None:
    assert issubclass(getattr(kvindex, name), kvindex.KVIndexError)


def test_star_import_gives_exactly_the_public_names() -> None:
    namespace: dict[str, object] = {}
    exec("from kvindex import *", namespace)
    assert sorted(k for k in namespace if k != "__builtins__") == PUBLIC


def test_an_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        kvindex.nope  # type: ignore[attr-defined]  # noqa: B018


def test_importing_kvindex_loads_nothing_heavy() -> None:
    code = (
        "import sys, kvindex\n"
        "heavy = ('kvindex.', 'msgspec', 'redis', 'prometheus_client', 'tokenizers')\n"
        "print(','.join(sorted(m for m in sys.modules if m.startswith(heavy))))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "kvindex.errors"
