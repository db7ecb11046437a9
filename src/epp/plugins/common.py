"""Parsers shared by plugin types."""

from __future__ import annotations

from epp.framework.params import Params


def no_parameters(params: Params) -> None:
    """For plugin types without parameters: any given is reported unknown by `finish`."""
    return None
