"""Typed reading of a plugin's `parameters` mapping with errors that name the parameter.

Each plugin factory reads the parameters it knows through a `Params`, then calls `finish()`,
which reports names it never read. llm-d's Go decoder ignores unknown names; so does the
loader by default, but not silently: `finish()` hands each unknown name to the `on_unknown`
callback the loader passed (it warns and counts them). Without a callback (the loader's
strict mode) an unknown name fails the load, so a misspelt parameter cannot silently take
the default."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from epp.errors import EPPError


class ParamError(EPPError, ValueError):
    """A bad parameter; the message starts with `parameter "<path>":`."""


_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """A Go-style duration (`150ms`, `2s`, `1m30s`) in seconds."""
    s = text.strip()
    if not s:
        raise ValueError("empty duration")
    pos, total = 0, 0.0
    while pos < len(s):
        m = _DURATION_PART.match(s, pos)
        if m is None:
            raise ValueError(f"invalid duration {text!r} (expected e.g. 150ms, 2s, 1m30s)")
        total += float(m.group(1)) * _DURATION_UNITS[m.group(2)]
        pos = m.end()
    return total


def _type_name(value: object) -> str:
    if value is None:
        return "null"
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "list"}.get(
        type(value), "mapping" if isinstance(value, Mapping) else type(value).__name__
    )


class Params:
    """A view over one parameters mapping; `path` prefixes nested names (`a.b`)."""

    def __init__(
        self,
        raw: Mapping[str, Any] | None,
        path: str = "",
        on_unknown: Callable[[str], None] | None = None,
    ) -> None:
        if raw is not None and not isinstance(raw, Mapping):
            where = f'parameter "{path}"' if path else "parameters"
            raise ParamError(f"{where}: must be a mapping, got {_type_name(raw)}")
        self._raw: dict[str, Any] = dict(raw or {})
        self._path = path
        self._read: set[str] = set()
        # Told the full path of each unknown name at `finish()`; None: unknown names fail.
        self._on_unknown = on_unknown

    def _full(self, name: str) -> str:
        return f"{self._path}.{name}" if self._path else name

    def fail(self, name: str, message: str) -> ParamError:
        return ParamError(f'parameter "{self._full(name)}": {message}')

    def _get(self, name: str) -> Any:
        self._read.add(name)
        return self._raw.get(name)

    def has(self, name: str) -> bool:
        return self._raw.get(name) is not None

    def integer(
        self, name: str, default: int, *, min: int | None = None, max: int | None = None
    ) -> int:
        value = self._get(name)
        if value is None:
            return default
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(name, f"must be an integer, got {_type_name(value)} {value!r}")
        self._check_range(name, value, min, max)
        return value

    def number(
        self,
        name: str,
        default: float,
        *,
        min: float | None = None,
        max: float | None = None,
        min_exclusive: bool = False,
    ) -> float:
        value = self._get(name)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.fail(name, f"must be a number, got {_type_name(value)} {value!r}")
        number = float(value)
        if not math.isfinite(number):
            raise self.fail(name, f"must be finite, got {value!r}")
        if min_exclusive and min is not None and number <= min:
            raise self.fail(name, f"must be greater than {min}, got {value!r}")
        self._check_range(name, number, min, max)
        return number

    def boolean(self, name: str, default: bool) -> bool:
        value = self._get(name)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self.fail(name, f"must be true or false, got {_type_name(value)} {value!r}")
        return value

    def string(self, name: str, default: str, *, choices: Iterable[str] | None = None) -> str:
        value = self._get(name)
        if value is None:
            return default
        if isinstance(value, int | float) and not isinstance(value, bool):
            value = str(value)  # hashSeed: 42 is as good as "42"
        if not isinstance(value, str):
            raise self.fail(name, f"must be a string, got {_type_name(value)} {value!r}")
        if choices is not None:
            allowed = list(choices)
            if value not in allowed:
                raise self.fail(name, f"must be one of {', '.join(allowed)}; got {value!r}")
        return value

    def duration(self, name: str, default: float, *, positive: bool = True) -> float:
        """Seconds, from a Go duration string or a number of seconds."""
        value = self._get(name)
        if value is None:
            return default
        if isinstance(value, bool):
            raise self.fail(name, f"must be a duration such as 2s, got {value!r}")
        if isinstance(value, int | float):
            seconds = float(value)
        elif isinstance(value, str):
            try:
                seconds = parse_duration(value)
            except ValueError as exc:
                raise self.fail(name, str(exc)) from None
        else:
            raise self.fail(name, f"must be a duration such as 2s, got {_type_name(value)}")
        if seconds < 0 or (positive and seconds == 0):
            raise self.fail(name, f"must be a positive duration, got {value!r}")
        return seconds

    def string_map(self, name: str) -> dict[str, str]:
        value = self._get(name)
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise self.fail(name, f"must be a mapping of strings, got {_type_name(value)}")
        out: dict[str, str] = {}
        for k, v in value.items():
            if (
                not isinstance(k, str)
                or not isinstance(v, str | int | float)
                or isinstance(v, bool)
            ):
                raise self.fail(f"{name}.{k}", "must be a string")
            out[k] = str(v)
        return out

    def string_list(self, name: str, default: list[str] | None = None) -> list[str]:
        value = self._get(name)
        if value is None:
            return list(default or [])
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.fail(name, f"must be a list of strings, got {_type_name(value)}")
        return list(value)

    def items(self, name: str) -> list[Any]:
        value = self._get(name)
        if value is None:
            return []
        if not isinstance(value, list):
            raise self.fail(name, f"must be a list, got {_type_name(value)}")
        return list(value)

    def nested(self, name: str) -> Params:
        """A nested mapping, read with the same strictness (call its `finish` too)."""
        value = self._get(name)
        if value is not None and not isinstance(value, Mapping):
            raise self.fail(name, f"must be a mapping, got {_type_name(value)}")
        return Params(value, self._full(name), self._on_unknown)

    def ignore(self, *names: str) -> None:
        """Accept these names without effect (llm-d parameters this implementation has no
        use for, e.g. `autoTune`); documented per plugin."""
        self._read.update(names)

    def remaining(self) -> dict[str, Any]:
        """The parameters not read so far (passed through opaquely, e.g. to a backend)."""
        return {k: v for k, v in self._raw.items() if k not in self._read}

    def finish(self) -> None:
        unknown = sorted(k for k in self._raw if k not in self._read)
        if unknown and self._on_unknown is not None:
            for name in unknown:
                self._on_unknown(self._full(name))
            return
        if unknown:
            known = ", ".join(sorted(self._read)) or "none"
            raise self.fail(unknown[0], f"unknown parameter (known: {known})")

    def _check_range(self, name: str, value: float, low: float | None, high: float | None) -> None:
        if low is not None and value < low:
            raise self.fail(name, f"must be >= {low}, got {value!r}")
        if high is not None and value > high:
            raise self.fail(name, f"must be <= {high}, got {value!r}")
