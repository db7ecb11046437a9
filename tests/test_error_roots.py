"""One exception root per package: every exception class kvindex or epp defines derives from
kvindex.errors.KVIndexError or epp.errors.EPPError (keeping its builtin base), so an embedder
catches a library's refusals with one except clause."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

from epp.errors import EPPError
from kvindex.errors import KVIndexError

ROOTS: dict[str, type[Exception]] = {"kvindex": KVIndexError, "epp": EPPError}
# Control flow inside one module, never raised to a caller.
INTERNAL = {"kvindex.podwatch.WatchExpired"}


def exception_classes(package: str) -> list[type[BaseException]]:
    root = importlib.import_module(package)
    found: list[type[BaseException]] = []
    for info in pkgutil.walk_packages(root.__path__, package + "."):
        if "._proto" in info.name or info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, BaseException) and cls.__module__ == info.name:
                found.append(cls)
    return found


@pytest.mark.parametrize("package", sorted(ROOTS))
def test_every_exception_derives_from_the_package_root(package: str) -> None:
    classes = exception_classes(package)
    assert len(classes) >= 5
    strays = [
        f"{cls.__module__}.{cls.__qualname__}"
        for cls in classes
        if not issubclass(cls, ROOTS[package])
        and f"{cls.__module__}.{cls.__qualname__}" not in INTERNAL
    ]
    assert strays == []
