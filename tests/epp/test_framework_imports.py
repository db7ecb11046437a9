"""The scheduling framework does not know its plugins, nor the picker's edges: every module
under src/epp/framework, read from the source (every import statement, including those inside
functions and under TYPE_CHECKING), imports from the project only the framework itself,
`epp.types` and `epp.errors` (the exception root, a leaf module). The registry of concrete
plugins is the caller's (`epp.plugins`).

(Named apart from tests/test_import_graph.py, the packages' layering: pytest imports test
modules by file name, and a second test_import_graph.py would collide with it.)"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"
FRAMEWORK = SRC / "epp" / "framework"
MODULES = sorted(FRAMEWORK.rglob("*.py"))
PROJECT = ("epp", "kvindex", "kvtools")
# All a framework module may import from the project.
ALLOWED = ("epp.framework", "epp.types", "epp.errors")
# The plugins and the edges (sockets, gRPC, HTTP, the CLI), named for a clear failure.
FORBIDDEN = (
    "epp.plugins",
    "epp.server",
    "epp.extproc",
    "epp.extproc_wire",
    "epp.h2edge",
    "epp.commands",
    "epp.cli",
    "epp.precise",
)


def imported_from_source(source: str, package: str) -> set[str]:
    """Every module the source imports; `from a import b` counts as `a.b` too (b may be a
    module). Relative imports are resolved against `package`."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                parts = package.split(".")
                base = parts[: len(parts) - node.level + 1]
                module = ".".join([*base, module] if module else base)
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def imported_modules(path: Path) -> set[str]:
    package = ".".join(path.relative_to(SRC).parts[:-1])
    return imported_from_source(path.read_text(), package)


def _within(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def test_the_framework_modules_are_found() -> None:
    names = {p.name for p in MODULES}
    assert {"__init__.py", "build.py", "config.py", "deps.py", "registry.py"} <= names


def test_the_reader_sees_every_kind_of_import() -> None:
    source = (
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from epp.plugins.prefix import PrefixParams\n"
        "def f():\n    import epp.server\n    from epp import extproc\n"
        "from . import cycle\nfrom ..plugins import shared\n"
    )
    found = imported_from_source(source, "epp.framework")
    expected = {
        "epp.plugins.prefix",
        "epp.server",
        "epp.extproc",
        "epp.framework.cycle",
        "epp.plugins.shared",
    }
    assert expected <= found


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_framework_module_imports_no_plugin_and_no_edge(path: Path) -> None:
    imported = imported_modules(path)
    assert sorted(m for m in imported if _within(m, FORBIDDEN)) == []
    project = {m for m in imported if m.split(".")[0] in PROJECT}
    assert sorted(m for m in project if not _within(m, ALLOWED)) == []


def test_importing_the_framework_loads_no_plugin_and_no_edge() -> None:
    code = (
        "import sys, epp.framework\n"
        f"print(','.join(sorted(m for m in sys.modules if m.startswith({FORBIDDEN!r}))))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == ""
