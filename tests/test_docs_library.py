"""Every ```python block of docs/library.md runs, each on its own in a fresh namespace (as the
page says), so the library page stays true."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

PAGE = Path(__file__).resolve().parents[1] / "docs" / "library.md"
BLOCK = re.compile(r"^```python\n(.*?)^```$", re.DOTALL | re.MULTILINE)


def blocks() -> list[tuple[str, str]]:
    """(the heading above the block, its code) for every python block, in page order."""
    text = PAGE.read_text()
    out: list[tuple[str, str]] = []
    for match in BLOCK.finditer(text):
        headings = re.findall(r"^#+ (.+)$", text[: match.start()], re.MULTILINE)
        out.append((headings[-1] if headings else "top", match.group(1)))
    return out


def test_the_page_has_examples() -> None:
    assert len(blocks()) >= 4


@pytest.mark.parametrize(
    "code", [code for _, code in blocks()], ids=[f"{i}-{h}" for i, (h, _) in enumerate(blocks())]
)
def test_example_runs(code: str) -> None:
    namespace: dict[str, object] = {"__name__": "__docs__"}
    exec(compile(code, str(PAGE), "exec"), namespace)
