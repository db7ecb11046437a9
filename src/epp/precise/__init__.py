"""Backends of the precise-prefix-cache-scorer: kvindex inside the picker's process
(`InProcessIndex`) or a kvindex sidecar over gRPC (`RemoteIndex`), chosen from the plugin's
parameters by `build_backend`."""

from epp.precise.factory import build_backend
from epp.precise.inprocess import InProcessIndex
from epp.precise.remote import RemoteIndex

__all__ = ["InProcessIndex", "RemoteIndex", "build_backend"]
