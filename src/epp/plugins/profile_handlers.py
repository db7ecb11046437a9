"""Profile handlers: single profile, and prefill/decode disaggregation."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from epp.framework.config import ConfigError
from epp.framework.cycle import CycleState
from epp.framework.params import Params
from epp.framework.plugin import Plugin, PreRequest, ProfileHandler
from epp.framework.registry import BuildContext, PluginType, Registry
from epp.plugins._request import prompt_tokens
from epp.plugins.common import no_parameters
from epp.plugins.shared import prefix_match
from epp.types import LLMRequest, ProfileResult, SchedulingError, SchedulingResult

PREFILLER_HEADER = "x-prefiller-host-port"
REJECTED_NO_ENDPOINTS = "rejected-no-endpoints"


class SingleProfileHandler(ProfileHandler):
    """Runs the first (only) profile once; it is the primary."""

    type_name = "single-profile-handler"

    def pick_profiles(
        self,
        cycle: CycleState,
        request: LLMRequest,
        profiles: Sequence[str],
        results: Mapping[str, ProfileResult | None],
    ) -> list[str]:
        return [] if results else [profiles[0]]

    def process_results(
        self,
        cycle: CycleState,
        request: LLMRequest,
        results: Mapping[str, ProfileResult | None],
    ) -> SchedulingResult:
        name, result = next(iter(results.items()))
        if result is None:
            raise SchedulingError(
                503, REJECTED_NO_ENDPOINTS, f"no endpoint passed the filters of profile {name!r}"
            )
        return SchedulingResult(profiles={name: result}, primary_profile=name)


# --- P/D deciders -------------------------------------------------------------------------


@dataclass(frozen=True)
class PrefixDeciderParams:
    non_cached_tokens: int = 0


def _parse_decider(params: Params) -> PrefixDeciderParams:
    return PrefixDeciderParams(params.integer("nonCachedTokens", 0, min=0))


class PrefixBasedPDDecider(Plugin):
    """Disaggregate when the prompt's part not cached on the chosen decode endpoint is at
    least `nonCachedTokens` tokens (0 disables disaggregation, as in llm-d). The cached part
    comes from the prefix scorer's match info in the cycle state; without it the whole
    prompt counts as uncached."""

    type_name = "prefix-based-pd-decider"

    def __init__(self, name: str, non_cached_tokens: int) -> None:
        super().__init__(name)
        self.non_cached_tokens = non_cached_tokens

    def disaggregate(self, cycle: CycleState, request: LLMRequest, decode_key: str) -> bool:
        if self.non_cached_tokens <= 0:
            return False
        total = prompt_tokens(request)
        if total < self.non_cached_tokens:
            return False
        info = prefix_match(cycle)
        cached = info.hit_tokens(decode_key) if info is not None else 0
        return total - cached >= self.non_cached_tokens


class AlwaysDisaggPDDecider(PrefixBasedPDDecider):
    type_name = "always-disagg-pd-decider"

    def __init__(self, name: str) -> None:
        super().__init__(name, 0)

    def disaggregate(self, cycle: CycleState, request: LLMRequest, decode_key: str) -> bool:
        return True


@dataclass(frozen=True)
class PDParams:
    decode_profile: str = "decode"
    prefill_profile: str = "prefill"
    non_cached_tokens: int = 0
    decider_plugin_name: str = ""
    # llm-d's older pd-profile-handler `threshold: 0` ran prefill for every request ("ALWAYS
    # DO PD" in the guides), unlike `nonCachedTokens: 0`, which never disaggregates.
    always_disaggregate: bool = False


def _parse_pd(params: Params) -> PDParams:
    non_cached = params.integer("nonCachedTokens", 0, min=0)
    always = False
    if params.has("threshold"):  # the older pd-profile-handler name for the same number
        non_cached = params.integer("threshold", 0, min=0)
        always = non_cached == 0
    else:
        params.ignore("threshold")
    primary_port = params.integer("primaryPort", 0, min=0, max=65535)
    if primary_port:
        raise params.fail("primaryPort", "data-parallel port rewriting is not supported")
    # Names of the prefix plugin to read: this implementation reads whichever prefix scorer
    # wrote the cycle's match info, so these are accepted without effect.
    params.ignore("prefixPluginType", "prefixPluginName", "hashBlockSize")
    deciders = params.nested("deciders")
    decider = deciders.string("prefill", "")
    deciders.ignore("encode")
    deciders.finish()
    return PDParams(
        decode_profile=params.string("decodeProfile", "decode"),
        prefill_profile=params.string("prefillProfile", "prefill"),
        non_cached_tokens=non_cached,
        decider_plugin_name=params.string("deciderPluginName", decider),
        always_disaggregate=always,
    )


class PDProfileHandler(ProfileHandler):
    """Runs the decode profile; then, if the decider says the request's uncached part is
    long enough, the prefill profile. Decode is primary; the prefill pick goes to the decode
    endpoint in `x-prefiller-host-port: ip:port`."""

    type_name = "pd-profile-handler"

    def __init__(self, name: str, params: PDParams) -> None:
        super().__init__(name)
        self.params = params
        self.decider: PrefixBasedPDDecider = (
            AlwaysDisaggPDDecider(f"{name}/decider")
            if params.always_disaggregate
            else PrefixBasedPDDecider(f"{name}/decider", params.non_cached_tokens)
        )

    def pick_profiles(
        self,
        cycle: CycleState,
        request: LLMRequest,
        profiles: Sequence[str],
        results: Mapping[str, ProfileResult | None],
    ) -> list[str]:
        decode, prefill = self.params.decode_profile, self.params.prefill_profile
        if decode not in results:
            return [decode]
        decoded = results[decode]
        if decoded is None or prefill in results:
            return []
        if self.decider.disaggregate(cycle, request, cycle.key(decoded.endpoints[0])):
            return [prefill]
        return []

    def process_results(
        self,
        cycle: CycleState,
        request: LLMRequest,
        results: Mapping[str, ProfileResult | None],
    ) -> SchedulingResult:
        decode, prefill = self.params.decode_profile, self.params.prefill_profile
        decoded = results.get(decode)
        if decoded is None:
            raise SchedulingError(
                503, REJECTED_NO_ENDPOINTS, f"no decode endpoint passed profile {decode!r}"
            )
        out = SchedulingResult(profiles={decode: decoded}, primary_profile=decode)
        prefilled = results.get(prefill)
        if prefilled is not None:
            out.profiles[prefill] = prefilled
            out.headers[PREFILLER_HEADER] = cycle.key(prefilled.endpoints[0])
        # Ran prefill but nothing passed its filters: serve decode-only rather than fail.
        return out


@dataclass(frozen=True)
class HeaderHandlerParams:
    prefill_profile: str = "prefill"


def _parse_header_handler(params: Params) -> HeaderHandlerParams:
    params.ignore("encodeProfile")
    return HeaderHandlerParams(params.string("prefillProfile", "prefill"))


class PrefillHeaderHandler(PreRequest):
    """Sets `x-prefiller-host-port` from the prefill profile's pick (llm-d's
    prefill-header-handler; the pd-profile-handler already does, so this is idempotent)."""

    type_name = "prefill-header-handler"

    def __init__(self, name: str, params: HeaderHandlerParams) -> None:
        super().__init__(name)
        self.prefill_profile = params.prefill_profile

    def pre_request(self, cycle: CycleState, request: LLMRequest, result: SchedulingResult) -> None:
        prefilled = result.profiles.get(self.prefill_profile)
        if prefilled is not None and prefilled.endpoints:
            result.headers[PREFILLER_HEADER] = cycle.key(prefilled.endpoints[0])


def _build_pd(name: str, params: PDParams, ctx: BuildContext) -> ProfileHandler:
    handler = PDProfileHandler(name, params)
    for profile in (params.decode_profile, params.prefill_profile):
        if profile not in ctx.profile_names:
            raise ConfigError(
                f"profile {profile!r} is not defined (schedulingProfiles: "
                f"{', '.join(sorted(ctx.profile_names))})"
            )

    def resolve() -> None:
        ref = params.decider_plugin_name
        if not ref:
            return
        decider = ctx.plugins.get(ref)
        if not isinstance(decider, PrefixBasedPDDecider):
            raise ConfigError(
                f"pd-profile-handler {name!r}: deciderPluginName {ref!r} names no P/D decider"
            )
        handler.decider = decider

    ctx.defer(resolve)
    return handler


def register(registry: Registry) -> None:
    registry.register(
        PluginType(
            SingleProfileHandler.type_name,
            SingleProfileHandler,
            no_parameters,
            lambda name, _p, _c: SingleProfileHandler(name),
            "one profile",
        ),
        aliases=("single-profile",),
    )
    registry.register(
        PluginType(PDProfileHandler.type_name, PDProfileHandler, _parse_pd, _build_pd, "P/D")
    )

    def build_decider(name: str, p: PrefixDeciderParams, _ctx: BuildContext) -> Plugin:
        return PrefixBasedPDDecider(name, p.non_cached_tokens)

    registry.register(
        PluginType(
            PrefixBasedPDDecider.type_name,
            PrefixBasedPDDecider,
            _parse_decider,
            build_decider,
            "disaggregate on uncached tokens",
        )
    )
    registry.register(
        PluginType(
            AlwaysDisaggPDDecider.type_name,
            AlwaysDisaggPDDecider,
            no_parameters,
            lambda name, _p, _c: AlwaysDisaggPDDecider(name),
            "always disaggregate",
        )
    )

    def build_header(name: str, p: HeaderHandlerParams, _ctx: BuildContext) -> PreRequest:
        return PrefillHeaderHandler(name, p)

    registry.register(
        PluginType(
            PrefillHeaderHandler.type_name,
            PrefillHeaderHandler,
            _parse_header_handler,
            build_header,
            "x-prefiller-host-port header",
        ),
        aliases=("disagg-headers-handler",),
    )
