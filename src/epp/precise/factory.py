"""Which backend a precise-prefix-cache-scorer gets."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from prometheus_client import CollectorRegistry

from epp.plugins.precise_prefix import PrecisePrefixParams, PrefixIndexBackend
from epp.precise.options import backend_options
from epp.types import Endpoint

EndpointsSubscriber = Callable[[Callable[[Sequence[Endpoint]], None]], None]


def build_backend(
    params: PrecisePrefixParams,
    *,
    registry: CollectorRegistry | None = None,
    subscribe_endpoints: EndpointsSubscriber | None = None,
) -> PrefixIndexBackend:
    """`indexerConfig.remoteIndex.address` set: a kvindex sidecar over gRPC; otherwise kvindex
    in this process (memory, or Redis with `redisConfig.address`)."""
    options = backend_options(params)
    if options.remote_address:
        from epp.precise.remote import RemoteIndex

        return RemoteIndex(params, options, registry=registry)
    from epp.precise.inprocess import InProcessIndex

    return InProcessIndex(
        params, options, registry=registry, subscribe_endpoints=subscribe_endpoints
    )
