"""The packages' layering, read from the source (every import statement, including those inside
functions and under TYPE_CHECKING): kvindex is the base, epp may import kvindex, and only the
tools package (kvtools) imports both."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# package -> the project packages it must never import
FORBIDDEN: dict[str, set[str]] = {
    "kvindex": {"epp", "kvtools"},
    "epp": {"kvtools"},
    "kvtools": set(),
}


def imported_top_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    tops: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            tops.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            tops.add(node.module.split(".")[0])
    return tops


def package_modules(package: str) -> list[Path]:
    return sorted(p for p in (SRC / package).rglob("*.py") if "_proto" not in p.parts)


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_respect_layers(package: str) -> None:
    offenders = {
        str(path.relative_to(SRC)): sorted(imported_top_packages(path) & FORBIDDEN[package])
        for path in package_modules(package)
        if imported_top_packages(path) & FORBIDDEN[package]
    }
    assert offenders == {}


def test_the_tools_package_is_where_both_libraries_meet() -> None:
    """kvindex imports neither epp nor kvtools (above), so kvtools is the only package that
    imports both libraries; it does (the analysis and the demo drive the picker over the
    index)."""
    imported = set().union(*(imported_top_packages(p) for p in package_modules("kvtools")))
    assert {"kvindex", "epp"} <= imported
