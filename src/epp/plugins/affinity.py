"""Affinity scorers: LoRA adapter placement and session stickiness."""

from __future__ import annotations

import base64
import binascii
from collections import OrderedDict
from dataclasses import dataclass

from epp.framework.cycle import CycleState
from epp.framework.params import Params
from epp.framework.plugin import PreRequest, ResponseHeaders, Scorer, Scores
from epp.framework.registry import BuildContext, PluginType, Registry
from epp.plugins.common import no_parameters
from epp.types import Endpoint, LLMRequest, SchedulingResult


class LoraAffinityScorer(Scorer):
    """1.0 where the adapter is running, 0.8 where there is room to load it, 0.6 where it is
    waiting to load, else 0. Requests without an adapter score 1.0 everywhere."""

    type_name = "lora-affinity-scorer"

    def score(self, cycle: CycleState, request: LLMRequest, endpoints: list[Endpoint]) -> Scores:
        lora = request.lora
        if not lora:
            return [1.0] * len(endpoints)
        out: list[float] = []
        for e in endpoints:
            m = e.metrics
            if lora in m.running_loras:
                out.append(1.0)
            elif len(m.running_loras | m.waiting_loras) < m.max_loras:
                out.append(0.8)
            elif lora in m.waiting_loras:
                out.append(0.6)
            else:
                out.append(0.0)
        return out


SESSION_TOKEN_HEADER = "x-session-token"
SESSION_ID_HEADER = "x-session-id"


def encode_session_token(endpoint_key: str) -> str:
    """The `x-session-token` value naming an endpoint (base64, as llm-d encodes its pod)."""
    return base64.standard_b64encode(endpoint_key.encode()).decode()


def decode_session_token(token: str) -> str | None:
    try:
        return base64.b64decode(token.encode(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None


@dataclass(frozen=True)
class SessionParams:
    max_sessions: int = 100_000


def _parse_session(params: Params) -> SessionParams:
    return SessionParams(params.integer("maxSessions", 100_000, min=1))


class SessionAffinityScorer(Scorer, PreRequest, ResponseHeaders):
    """Sticky sessions. `x-session-token` (base64 of the endpoint key, or of the pod name,
    llm-d's encoding) names the endpoint directly; `x-session-id` is an opaque id whose last
    endpoint this scorer remembers (LRU, `maxSessions`; updated to the endpoint that actually
    served, when the proxy fell back). That endpoint scores 1, others 0.
    Each decision carries `x-session-token` for the served endpoint in
    `SchedulingResult.response_headers`, for the edge to return to the client."""

    type_name = "session-affinity-scorer"

    def __init__(self, name: str, params: SessionParams) -> None:
        super().__init__(name)
        self.max_sessions = params.max_sessions
        self._sessions: OrderedDict[str, str] = OrderedDict()
        self.invalid_tokens = 0

    def _target(self, request: LLMRequest) -> str | None:
        token = request.headers.get(SESSION_TOKEN_HEADER)
        if token:
            target = decode_session_token(token)
            if target is None:
                self.invalid_tokens += 1
            return target
        session = request.headers.get(SESSION_ID_HEADER)
        if session:
            target = self._sessions.get(session)
            if target is not None:
                self._sessions.move_to_end(session)
            return target
        return None

    def score(self, cycle: CycleState, request: LLMRequest, endpoints: list[Endpoint]) -> Scores:
        target = self._target(request)
        if target is None:
            return [0.0] * len(endpoints)
        return [
            1.0 if cycle.key(e) == target or (e.pod_name and e.pod_name == target) else 0.0
            for e in endpoints
        ]

    def pre_request(self, cycle: CycleState, request: LLMRequest, result: SchedulingResult) -> None:
        picked = result.endpoints
        if not picked:
            return
        key = cycle.key(picked[0])
        session = request.headers.get(SESSION_ID_HEADER)
        if session:
            self._sessions[session] = key
            self._sessions.move_to_end(session)
            while len(self._sessions) > self.max_sessions:
                self._sessions.popitem(last=False)
        result.response_headers[SESSION_TOKEN_HEADER] = encode_session_token(key)

    def on_response_headers(self, request: LLMRequest, served: str | None) -> None:
        # The proxy may have fallen back to another endpoint: the session follows it.
        session = request.headers.get(SESSION_ID_HEADER)
        if session and served and self._sessions.get(session) not in (None, served):
            self._sessions[session] = served

    def sessions(self) -> int:
        return len(self._sessions)


def register(registry: Registry) -> None:
    registry.register(
        PluginType(
            LoraAffinityScorer.type_name,
            LoraAffinityScorer,
            no_parameters,
            lambda name, _p, _c: LoraAffinityScorer(name),
            "LoRA adapter placement",
        )
    )

    def build_session(name: str, p: SessionParams, _ctx: BuildContext) -> Scorer:
        return SessionAffinityScorer(name, p)

    registry.register(
        PluginType(
            SessionAffinityScorer.type_name,
            SessionAffinityScorer,
            _parse_session,
            build_session,
            "sticky sessions",
        )
    )
