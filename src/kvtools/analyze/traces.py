"""The public traces shipped as package data (see data/README.md for their licence)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

__all__ = ["SHIPPED_TRACES", "resolve_trace"]

SHIPPED_TRACES: dict[str, str] = {
    "mooncake-conversation": "mooncake_conversation_trace.jsonl",
    "mooncake-synthetic": "mooncake_synthetic_trace.jsonl",
}


def resolve_trace(name_or_path: str) -> Path:
    """A shipped trace's name, or a path. Raises FileNotFoundError naming the choices."""
    file_name = SHIPPED_TRACES.get(name_or_path)
    if file_name is not None:
        ref = resources.files("kvtools.analyze").joinpath("data", file_name)
        return Path(str(ref))
    path = Path(name_or_path)
    if not path.exists():
        choices = ", ".join(SHIPPED_TRACES)
        raise FileNotFoundError(f"trace {name_or_path!r}: no such file (shipped traces: {choices})")
    return path
