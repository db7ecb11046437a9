"""`epp`'s public API: the names at the top of the package are pinned (adding or removing
one is a decision, made here), each resolves, and `import epp` alone stays cheap."""

from __future__ import annotations

import subprocess
import sys

import pytest

import epp

PUBLIC = [
    "ConfigError",
    "EPPError",
    "Endpoint",
    "EngineMetrics",
    "LLMRequest",
    "PickerConfig",
    "PickerServer",
    "ResponseStats",
    "Scheduler",
    "SchedulerDeps",
    "SchedulingError",
    "SchedulingResult",
    "ServeConfig",
    "__version__",
    "build_scheduler",
    "default_registry",
    "load_config",
]


def test_all_is_pinned_and_sorted() -> None:
    assert epp.__all__ == PUBLIC
    assert sorted(PUBLIC) == PUBLIC


@pytest.mark.parametrize("name", PUBLIC)
def test_each_name_resolves(name: str) -> None:
    value = getattr(epp, name)
    assert value is not None
    assert name in dir(epp)
    if name != "__version__":
        # The object itself, from the module that defines it (not a copy or a wrapper).
        assert value.__module__.startswith("epp.")
        assert getattr(sys.modules[value.__module__], name) is value


def test_star_import_gives_exactly_the_public_names() -> None:
    namespace: dict[str, object] = {}
    exec("from epp import *", namespace)
    assert sorted(k for k in namespace if k != "__builtins__") == PUBLIC


def test_an_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        epp.nope  # type: ignore[attr-defined]  # noqa: B018


def test_importing_epp_loads_nothing_heavy() -> None:
    code = (
        "import sys, epp\n"
        "heavy = ('epp.', 'yaml', 'grpc', 'aiohttp', 'kvindex')\n"
        "print(','.join(sorted(m for m in sys.modules if m.startswith(heavy))))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == ""
