"""llm-d's disaggregation profile handler (encode / prefill / decode), its multimodal encode
decider, and the data-parallel profile handler.

`disagg-profile-handler` runs the decode profile first; then, if an encode profile is
defined and its decider says so for the chosen decode endpoint, the encode profile; then, if
a prefill profile is defined and its decider says so, the prefill profile. Decode is
primary. The prefill pick goes to the decode endpoint as `x-prefiller-host-port`, every
encode pick as `x-encoder-hosts-ports` (comma-separated). Without a decider the stage is
never run (llm-d: "P/D disaggregation disabled")."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from epp.framework.config import ConfigError
from epp.framework.cycle import CycleState
from epp.framework.params import Params
from epp.framework.plugin import ProfileHandler
from epp.framework.registry import BuildContext, PluginType, Registry
from epp.plugins.common import no_parameters
from epp.plugins.profile_handlers import (
    PREFILLER_HEADER,
    REJECTED_NO_ENDPOINTS,
    PrefixBasedPDDecider,
)
from epp.types import Endpoint, LLMRequest, ProfileResult, SchedulingError, SchedulingResult

log = logging.getLogger(__name__)

ENCODERS_HEADER = "x-encoder-hosts-ports"
DATA_PARALLEL_HEADER = "x-data-parallel-host-port"
# vLLM's multimodal content parts (docs/features/multimodal_inputs.md, online serving).
MULTIMODAL_PART_TYPES = frozenset({"image_url", "video_url", "input_audio"})


def has_multimodal_content(request: LLMRequest) -> bool:
    for message in request.messages or ():
        content = message.get("content")
        if isinstance(content, list):
            for part in content:
                if isinstance(part, Mapping) and part.get("type") in MULTIMODAL_PART_TYPES:
                    return True
    return False


class AlwaysDisaggMultimodalDecider(PrefixBasedPDDecider):
    """Encode decider: disaggregate exactly when a chat message carries an image, video or
    audio part."""

    type_name = "always-disagg-multimodal-decider"

    def __init__(self, name: str) -> None:
        super().__init__(name, 0)

    def disaggregate(self, cycle: CycleState, request: LLMRequest, decode_key: str) -> bool:
        return has_multimodal_content(request)


# --- disagg-profile-handler ---------------------------------------------------------------

_LEGACY_NAMES = (
    "decodeProfile",
    "prefillProfile",
    "encodeProfile",
    "deciderPluginName",
    "prefillDeciderPluginName",
    "encodeDeciderPluginName",
)


@dataclass(frozen=True)
class DisaggParams:
    decode_profile: str = "decode"
    prefill_profile: str = "prefill"
    encode_profile: str = "encode"
    prefill_decider: str = ""
    encode_decider: str = ""


def _parse_disagg(params: Params) -> DisaggParams:
    nested_given = params.has("profiles") or params.has("deciders")
    legacy_given = [n for n in _LEGACY_NAMES if params.has(n)]
    if nested_given and legacy_given:
        raise params.fail(
            legacy_given[0],
            "cannot mix deprecated flat parameters (decodeProfile, prefillProfile, "
            "encodeProfile, deciderPluginName, prefillDeciderPluginName, "
            "encodeDeciderPluginName) with nested parameters (profiles, deciders): use one "
            "format or the other",
        )
    profiles = params.nested("profiles")
    deciders = params.nested("deciders")
    decode = profiles.string("decode", "") or params.string("decodeProfile", "")
    prefill = profiles.string("prefill", "") or params.string("prefillProfile", "")
    encode = profiles.string("encode", "") or params.string("encodeProfile", "")
    prefill_decider = (
        deciders.string("prefill", "")
        or params.string("prefillDeciderPluginName", "")
        or params.string("deciderPluginName", "")
    )
    encode_decider = deciders.string("encode", "") or params.string("encodeDeciderPluginName", "")
    profiles.finish()
    deciders.finish()
    return DisaggParams(
        decode_profile=decode or "decode",
        prefill_profile=prefill or "prefill",
        encode_profile=encode or "encode",
        prefill_decider=prefill_decider,
        encode_decider=encode_decider,
    )


class DisaggProfileHandler(ProfileHandler):
    type_name = "disagg-profile-handler"

    def __init__(self, name: str, params: DisaggParams) -> None:
        super().__init__(name)
        self.params = params
        self.prefill_decider: PrefixBasedPDDecider | None = None
        self.encode_decider: PrefixBasedPDDecider | None = None

    def pick_profiles(
        self,
        cycle: CycleState,
        request: LLMRequest,
        profiles: Sequence[str],
        results: Mapping[str, ProfileResult | None],
    ) -> list[str]:
        p = self.params
        if p.decode_profile not in results:
            return [p.decode_profile]
        decoded = results[p.decode_profile]
        if decoded is None or not decoded.endpoints:
            return []
        decode_key = cycle.key(decoded.endpoints[0])
        # Each optional stage is asked once: the scheduler calls back after every run, and a
        # stage skipped now must not be reconsidered, so the decision is kept in the cycle.
        for stage, decider in (
            (p.encode_profile, self.encode_decider),
            (p.prefill_profile, self.prefill_decider),
        ):
            if stage not in profiles or stage in results:
                continue
            asked_key = f"{self.name}/asked/{stage}"
            if cycle.read(asked_key, bool):
                continue
            cycle.write(asked_key, True)
            if decider is not None and decider.disaggregate(cycle, request, decode_key):
                return [stage]
        return []

    def process_results(
        self,
        cycle: CycleState,
        request: LLMRequest,
        results: Mapping[str, ProfileResult | None],
    ) -> SchedulingResult:
        p = self.params
        decoded = results.get(p.decode_profile)
        if decoded is None or not decoded.endpoints:
            raise SchedulingError(
                503,
                REJECTED_NO_ENDPOINTS,
                f"failed to find available decode workers (profile {p.decode_profile!r})",
            )
        out = SchedulingResult(
            profiles={p.decode_profile: decoded}, primary_profile=p.decode_profile
        )
        prefilled = results.get(p.prefill_profile)
        if prefilled is not None and prefilled.endpoints:
            out.profiles[p.prefill_profile] = prefilled
            out.headers[PREFILLER_HEADER] = cycle.key(prefilled.endpoints[0])
        encoded = results.get(p.encode_profile)
        if encoded is not None and encoded.endpoints:
            out.profiles[p.encode_profile] = encoded
            out.headers[ENCODERS_HEADER] = ",".join(cycle.key(e) for e in encoded.endpoints)
        return out


def _build_disagg(name: str, params: DisaggParams, ctx: BuildContext) -> ProfileHandler:
    if params.decode_profile not in ctx.profile_names:
        raise ConfigError(
            f"profile {params.decode_profile!r} is not defined (schedulingProfiles: "
            f"{', '.join(sorted(ctx.profile_names))})"
        )
    handler = DisaggProfileHandler(name, params)

    def find(role: str, ref: str) -> PrefixBasedPDDecider | None:
        if not ref:
            log.info("%s %r: no deciders.%s configured; that stage is disabled", name, name, role)
            return None
        decider = ctx.plugins.get(ref)
        if decider is None:
            raise ConfigError(
                f"disagg-profile-handler {name!r}: deciders.{role} plugin not found: {ref}"
            )
        if not isinstance(decider, PrefixBasedPDDecider):
            raise ConfigError(f"disagg-profile-handler {name!r}: plugin {ref!r} is not a decider")
        return decider

    def resolve() -> None:
        handler.prefill_decider = find("prefill", params.prefill_decider)
        handler.encode_decider = find("encode", params.encode_decider)

    ctx.defer(resolve)
    return handler


# --- data-parallel-profile-handler --------------------------------------------------------


def _parse_data_parallel(params: Params) -> int:
    return params.integer("primaryPort", 8000, min=0, max=65535)


class DataParallelProfileHandler(ProfileHandler):
    """One profile; the pick's `ip:port` goes to the engine as `x-data-parallel-host-port`
    and the destination becomes the same address on `primaryPort` (the data-parallel
    engine's front port). Deprecated in llm-d in favour of single-profile-handler."""

    type_name = "data-parallel-profile-handler"

    def __init__(self, name: str, primary_port: int) -> None:
        super().__init__(name)
        self.primary_port = primary_port

    def pick_profiles(
        self,
        cycle: CycleState,
        request: LLMRequest,
        profiles: Sequence[str],
        results: Mapping[str, ProfileResult | None],
    ) -> list[str]:
        return [] if results else [profiles[0]]

    def _on_primary_port(self, endpoint: Endpoint) -> Endpoint:
        if not self.primary_port or endpoint.port == self.primary_port:
            return endpoint
        return Endpoint(
            address=endpoint.address,
            port=self.primary_port,
            labels=endpoint.labels,
            role=endpoint.role,
            engine_type=endpoint.engine_type,
            pod_name=endpoint.pod_name,
            metrics=endpoint.metrics,
        )

    def process_results(
        self,
        cycle: CycleState,
        request: LLMRequest,
        results: Mapping[str, ProfileResult | None],
    ) -> SchedulingResult:
        name, result = next(iter(results.items()))
        if result is None or not result.endpoints:
            raise SchedulingError(
                503, REJECTED_NO_ENDPOINTS, f"failed to run scheduler profile {name!r}"
            )
        rewritten = ProfileResult(
            name=result.name,
            endpoints=[self._on_primary_port(e) for e in result.endpoints],
            scores=result.scores,
        )
        out = SchedulingResult(profiles={name: rewritten}, primary_profile=name)
        out.headers[DATA_PARALLEL_HEADER] = cycle.key(result.endpoints[0])
        return out


def _build_data_parallel(name: str, primary_port: int, ctx: BuildContext) -> ProfileHandler:
    if len(ctx.profile_names) != 1:
        raise ConfigError(
            f"data-parallel-profile-handler {name!r} requires exactly one scheduling profile, "
            f"got {len(ctx.profile_names)}"
        )
    log.warning(
        "data-parallel-profile-handler %r is deprecated in llm-d (use single-profile-handler "
        "with Istio >= 1.28.1)",
        name,
    )
    return DataParallelProfileHandler(name, primary_port)


def register(registry: Registry) -> None:
    registry.register(
        PluginType(
            DisaggProfileHandler.type_name,
            DisaggProfileHandler,
            _parse_disagg,
            _build_disagg,
            "E/P/D disaggregation with pluggable deciders",
        )
    )
    registry.register(
        PluginType(
            AlwaysDisaggMultimodalDecider.type_name,
            AlwaysDisaggMultimodalDecider,
            no_parameters,
            lambda name, _p, _c: AlwaysDisaggMultimodalDecider(name),
            "encode when the request carries images, video or audio",
        )
    )
    registry.register(
        PluginType(
            DataParallelProfileHandler.type_name,
            DataParallelProfileHandler,
            _parse_data_parallel,
            _build_data_parallel,
            "data-parallel engines behind one port",
        )
    )
