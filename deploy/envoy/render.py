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


if __name__ == "__main__":
    pairs = dict(arg.split("=", 1) for arg in sys.argv[1:])
    sys.stdout.write(render(**pairs))
