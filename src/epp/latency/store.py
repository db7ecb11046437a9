"""The latency model's file: JSON, versioned, written atomically (temp file in the same
directory, fsync, rename), so a crash mid-save leaves the previous model intact."""

from __future__ import annotations

import json
import os
import pathlib
import tempfile
from typing import Any

from epp.errors import EPPError
from epp.latency.model import LatencyModel

FORMAT = "epp-latency-model"
VERSION = 1


class LatencyModelFormatError(EPPError, ValueError):
    """The file is not a latency model this version can read."""


def save_model(path: pathlib.Path, model: LatencyModel) -> None:
    document = {"format": FORMAT, "version": VERSION, "model": model.to_dict()}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(document, f, separators=(",", ":"))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise


def load_model(path: pathlib.Path, **overrides: Any) -> LatencyModel | None:
    """The saved model, or None when there is no file. A file that is not a readable model
    raises LatencyModelFormatError saying why."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise LatencyModelFormatError(f"{path}: not JSON ({exc})") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise LatencyModelFormatError(f"{path}: not an {FORMAT} file")
    if document.get("version") != VERSION:
        raise LatencyModelFormatError(
            f"{path}: format version {document.get('version')!r}, this build reads {VERSION}"
        )
    try:
        return LatencyModel.from_dict(document["model"], **overrides)
    except (KeyError, TypeError, ValueError) as exc:
        raise LatencyModelFormatError(f"{path}: malformed model ({exc!r})") from None
