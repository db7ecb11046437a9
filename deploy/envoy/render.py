"""Render envoy.yaml.tmpl: `python deploy/envoy/render.py [NAME=VALUE ...] > envoy.yaml`.
Standard library only, so it runs anywhere Envoy is deployed. With no arguments it prints
the defaults, which is exactly the envoy.yaml checked in beside it."""

from __future__ import annotations

import string
import sys
from pathlib import Path

TEMPLATE = Path(__file__).with_name("envoy.yaml.tmpl")

DEFAULTS: dict[str, str] = {
    "LISTEN_ADDRESS": "0.0.0.0",
    "LISTEN_PORT": "8081",
    "ADMIN_ADDRESS": "127.0.0.1",
    "ADMIN_PORT": "9901",
    "EPP_HOST": "127.0.0.1",
    "EPP_PORT": "9002",
    "FAILURE_MODE_ALLOW": "false",
    "FALLBACK_HOST": "127.0.0.1",
    "FALLBACK_PORT": "8000",
    "MESSAGE_TIMEOUT": "10s",
    "REQUEST_BODY_MODE": "FULL_DUPLEX_STREAMED",
    "RESPONSE_BODY_MODE": "NONE",
}


def render(**values: object) -> str:
    unknown = set(values) - set(DEFAULTS)
    if unknown:
        raise KeyError(f"unknown placeholders: {', '.join(sorted(unknown))}")
    merged = {
        **DEFAULTS,
        **{k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in values.items()},
    }
    return string.Template(TEMPLATE.read_text()).substitute(merged)


USAGE = (
    "usage: python deploy/envoy/render.py [NAME=VALUE ...] > envoy.yaml\n"
    "placeholders (defaults): "
    + ", ".join(f"{name}={value}" for name, value in DEFAULTS.items())
    + "\n"
)


def main(argv: list[str]) -> int:
    """The command line: NAME=VALUE pairs; anything else is a usage error (exit 2)."""
    if any(arg in ("-h", "--help") for arg in argv):
        sys.stdout.write(USAGE)
        return 0
    pairs: dict[str, str] = {}
    for arg in argv:
        name, sep, value = arg.partition("=")
        if not sep or name not in DEFAULTS:
            sys.stderr.write(f"render.py: {arg!r} is not NAME=VALUE with a known NAME\n{USAGE}")
            return 2
        pairs[name] = value
    sys.stdout.write(render(**pairs))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
