"""Helpers shared by the analyze tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_mooncake(path: Path, rows: list[tuple[float, int, int, list[int]]]) -> Path:
    with path.open("w") as f:
        for ts, inp, out, ids in rows:
            f.write(
                json.dumps(
                    {"timestamp": ts, "input_length": inp, "output_length": out, "hash_ids": ids}
                )
                + "\n"
            )
    return path


def by_policy(point: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {p["policy"]: p for p in point["policies"]}
