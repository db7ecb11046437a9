"""The plugins Gateway API Inference Extension's conformance tests configure: a filter that
lets the test choose the endpoints by header, and a reporter of the endpoint that served."""

from __future__ import annotations

from epp.framework.cycle import CycleState
from epp.framework.plugin import Filter, PreRequest
from epp.framework.registry import PluginType, Registry
from epp.plugins.common import no_parameters
from epp.types import Endpoint, LLMRequest, SchedulingResult

SELECTION_HEADER = "test-epp-endpoint-selection"
SERVED_RESULT_HEADER = "x-conformance-test-served-endpoint"


def _split_host_port(item: str) -> tuple[str, str]:
    """`ip:port`, `[v6]:port`, a bare IPv4 or (bracketed) IPv6 address -> (host, port)."""
    if item.startswith("["):
        host, _, rest = item[1:].partition("]")
        return host, rest[1:] if rest.startswith(":") else ""
    if item.count(":") == 1:
        host, port = item.split(":")
        return host, port
    return item, ""  # IPv4 without port, or an unbracketed IPv6 address


class HeaderBasedTestingFilter(Filter):
    """Keeps the endpoints named in the request header `test-epp-endpoint-selection` (a
    comma-separated list of `ip` or `ip:port`), in header order, one per IP; none without
    the header."""

    type_name = "header-based-testing-filter"

    def filter(
        self, cycle: CycleState, request: LLMRequest, endpoints: list[Endpoint]
    ) -> list[Endpoint]:
        value = request.headers.get(SELECTION_HEADER, "").strip()
        if not value:
            return []
        by_ip: dict[str, Endpoint] = {}
        by_host_port: dict[tuple[str, str], Endpoint] = {}
        for e in endpoints:
            by_ip[e.address] = e
            by_host_port[(e.address, str(e.port))] = e
        kept: list[Endpoint] = []
        seen: set[str] = set()
        for raw in value.split(","):
            item = raw.strip()
            if not item:
                continue
            host, port = _split_host_port(item)
            endpoint = by_host_port.get((host, port)) if port else by_ip.get(host)
            if endpoint is not None and endpoint.address not in seen:
                seen.add(endpoint.address)
                kept.append(endpoint)
        return kept


class DestinationEndpointServedVerifier(PreRequest):
    """Puts `x-conformance-test-served-endpoint: <ip:port>` on the response to the client.
    llm-d writes the endpoint Envoy reports as served (`x-gateway-destination-endpoint-served`
    metadata); this picker writes the endpoint it chose (response headers are fixed at
    decision time here), which is the served one unless Envoy fell back."""

    type_name = "destination-endpoint-served-verifier"

    def pre_request(self, cycle: CycleState, request: LLMRequest, result: SchedulingResult) -> None:
        if result.endpoints:
            result.response_headers[SERVED_RESULT_HEADER] = cycle.key(result.endpoints[0])


def register(registry: Registry) -> None:
    registry.register(
        PluginType(
            HeaderBasedTestingFilter.type_name,
            HeaderBasedTestingFilter,
            no_parameters,
            lambda name, _p, _c: HeaderBasedTestingFilter(name),
            "endpoints named by the test-epp-endpoint-selection header",
        )
    )
    registry.register(
        PluginType(
            DestinationEndpointServedVerifier.type_name,
            DestinationEndpointServedVerifier,
            no_parameters,
            lambda name, _p, _c: DestinationEndpointServedVerifier(name),
            "x-conformance-test-served-endpoint response header",
        )
    )
