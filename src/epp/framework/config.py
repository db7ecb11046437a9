"""EndpointPickerConfig: load, validate and default llm-d's YAML.

Everything is checked here, before any plugin is built: the document shape, each plugin's
type and parameters (through its registered parser), each profile's references, and the
sections that reference plugins (`saturationDetector`, `dataLayer`, `parser`, `flowControl`).
Errors name the entry (`plugins[2] (type "queue-scorer"): parameter "foo": ...`).

Unknown plugin parameters are accepted as llm-d accepts them (its Go decoder ignores them),
but never silently: each is logged once per (plugin type, parameter) at WARNING and listed in
`PickerConfig.unknown_parameters` (the server counts them in a metric); `strict=True` fails
the load instead.

The plugin types, and what a config that leaves things out defaults to, come from the
`Registry` the caller passes (`epp.plugins.default_registry()` for the built-ins)."""

from __future__ import annotations

import logging
import math
import pathlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from epp.errors import EPPError
from epp.framework.params import ParamError, Params
from epp.framework.plugin import Filter, Picker, ProfileHandler, Scorer
from epp.framework.registry import PluginType, Registry

log = logging.getLogger(__name__)

# Every group/version llm-d-router and GIE have read EndpointPickerConfig under.
API_VERSIONS = (
    "llm-d.ai/v1alpha1",
    "llm-d.ai/v1",
    "inference.networking.x-k8s.io/v1alpha1",
    "config.x-k8s.io/v1alpha1",
    "config.apix.gateway-api-inference-extension.sigs.k8s.io/v1alpha1",
)
KIND = "EndpointPickerConfig"
DEFAULT_PROFILE = "default"

# The feature gates llm-d-router registers (its loader rejects any other name), plus GIE's
# older `prepareDataPlugins`, which GIE-era configs still carry.
FEATURE_GATES = ("dataLayer", "enableLegacyMetrics", "flowControl", "prepareDataPlugins")
FLOW_CONTROL_GATE = "flowControl"

# Older spellings of sections, read as the current ones (GIE named `dataLayer` `data` until
# 2026-04; `requestHandling` holds the parser reference in some llm-d configs).
SECTION_ALIASES = {"data": "dataLayer", "requestHandling": "parser"}
KNOWN_SECTIONS = (
    "apiVersion",
    "kind",
    "plugins",
    "schedulingProfiles",
    "saturationDetector",
    "featureGates",
    "dataLayer",
    "flowControl",
    "parser",
    *SECTION_ALIASES,
)
# Sections parsed, validated and kept on the config that the picker does not act on; the
# server logs each at start-up (`PickerConfig.inactive_sections`). `flowControl` is acted on
# only with the `flowControl` feature gate (as llm-d); without it, it is listed here.
INACTIVE_SECTIONS: tuple[str, ...] = ()

# What a section's reference must point at, by upstream's built-in type names; a registry
# may add types to a role (`Registry.add_role`, e.g. test doubles).
ROLE_TYPES: dict[str, tuple[str, ...]] = {
    "parser": ("openai-parser", "passthrough-parser", "vertexai-parser", "vllmgrpc-parser"),
    "data-source": (
        "metrics-data-source",
        "models-data-source",
        "endpoint-notification-source",
        "k8s-notification-source",
    ),
    # Extractors are by interface upstream: these producers and scorers are extractors too.
    "data-extractor": (
        "core-metrics-extractor",
        "models-data-extractor",
        "inflight-load-producer",
        "precise-prefix-cache-scorer",
        "precise-prefix-cache-producer",
    ),
    "saturation-detector": ("utilization-detector", "concurrency-detector"),
    "ordering-policy": (
        "fcfs-ordering-policy",
        "edf-ordering-policy",
        "slo-deadline-ordering-policy",
    ),
    "fairness-policy": ("global-strict-fairness-policy", "round-robin-fairness-policy"),
    "usage-limit-policy": ("static-usage-limit-policy",),
}
# llm-d's saturation detector when none is configured (injected when referenced).
DEFAULT_SATURATION_DETECTOR = "utilization-detector"
# What llm-d injects when flowControl leaves a policy out.
DEFAULT_ORDERING_POLICY = "fcfs-ordering-policy"
DEFAULT_FAIRNESS_POLICY = "global-strict-fairness-policy"
DEFAULT_USAGE_LIMIT_POLICY = "static-usage-limit-policy"

# (plugin type, parameter path) pairs already warned about in this process: once each.
_warned_unknown: set[tuple[str, str]] = set()


class ConfigError(EPPError, ValueError):
    """The configuration is invalid; the message names the offending entry."""


@dataclass(frozen=True)
class PluginSpec:
    name: str
    type_name: str  # canonical type (aliases resolved)
    parameters: Any  # what the type's parser returned
    where: str  # `plugins[2] (type "queue-scorer")`
    declared_type: str = ""  # as written (may be an alias)


@dataclass(frozen=True)
class ProfilePluginRef:
    plugin_ref: str
    weight: float


@dataclass(frozen=True)
class ProfileSpec:
    name: str
    plugins: tuple[ProfilePluginRef, ...]


@dataclass(frozen=True)
class SaturationConfig:
    queue_depth_threshold: int = 5
    kv_cache_util_threshold: float = 0.8
    metrics_staleness_threshold_s: float = 0.2


@dataclass(frozen=True)
class UnknownParameter:
    """A plugin parameter the type does not read: accepted (as llm-d) and reported."""

    plugin_type: str
    parameter: str  # dotted path inside `parameters`
    where: str  # `plugins[2] (type "queue-scorer")`


@dataclass(frozen=True)
class DataSourceSpec:
    plugin_ref: str
    extractor_refs: tuple[str, ...] = ()


@dataclass(frozen=True)
class DataLayerConfig:
    """`dataLayer` (or GIE's `data`): which data sources feed which extractors."""

    inject_defaults: bool = True
    sources: tuple[DataSourceSpec, ...] = ()
    discovery_ref: str = ""


@dataclass(frozen=True)
class PriorityBandSpec:
    priority: int
    max_bytes: int | None = None
    max_requests: int | None = None
    fairness_policy_ref: str = ""
    ordering_policy_ref: str = ""


@dataclass(frozen=True)
class FlowControlConfig:
    """`flowControl`, as llm-d reads it. `enabled` is the `flowControl` feature gate: without
    it llm-d ignores the section (after decoding it) and so do we."""

    enabled: bool = False
    max_bytes: int | None = None
    max_requests: int | None = None
    default_request_ttl_s: float | None = None
    default_priority_band: PriorityBandSpec | None = None
    priority_bands: tuple[PriorityBandSpec, ...] = ()
    usage_limit_policy_ref: str = ""


@dataclass(frozen=True)
class PickerConfig:
    api_version: str
    plugins: tuple[PluginSpec, ...]
    profiles: tuple[ProfileSpec, ...]
    profile_handler: str  # plugin name
    # The registry the plugins were parsed with; `build_scheduler` builds them with it.
    registry: Registry = field(compare=False, repr=False)
    saturation: SaturationConfig = SaturationConfig()
    feature_gates: frozenset[str] = frozenset()
    # Sections present that the picker parses and validates but does not act on yet.
    inactive_sections: tuple[str, ...] = ()
    source: str = "<defaults>"
    # Plugins the loader added because the config left them out (llm-d's defaulting).
    defaulted: tuple[str, ...] = field(default_factory=tuple)
    # `saturationDetector.pluginRef`: the plugin that decides saturation ("" = the built-in
    # detector with `saturation`'s thresholds).
    saturation_detector_ref: str = ""
    data_layer: DataLayerConfig | None = None
    flow_control: FlowControlConfig | None = None
    parser_ref: str = ""  # "" = the built-in OpenAI parsing (llm-d's default openai-parser)
    unknown_parameters: tuple[UnknownParameter, ...] = ()
    # Older section names the document used (`data` for `dataLayer`, ...), for the logs.
    aliased_sections: tuple[str, ...] = ()

    def plugin(self, name: str) -> PluginSpec:
        for spec in self.plugins:
            if spec.name == name:
                return spec
        raise KeyError(name)


def load_config(
    source: str | pathlib.Path | None, registry: Registry, *, strict: bool = False
) -> PickerConfig:
    """Parse an EndpointPickerConfig against `registry`'s plugin types. `None` gives the
    registry's default config; a `Path`, or a string that names an existing file, is read;
    any other string is the YAML text itself. `strict` fails on unknown plugin parameters
    (llm-d ignores them; by default they are warned about once and reported)."""
    if source is None or (isinstance(source, str) and not source.strip()):
        # No config, or empty config text (an unset --config-text): the defaults.
        defaults = yaml.safe_load(registry.defaults.config_yaml)
        return _parse_document(defaults, registry, "<defaults>", strict)
    text, origin = _read_source(source)
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{origin}: invalid YAML: {exc}") from None
    if document is None:
        # An empty file (or only comments) means the defaults, never a profile without
        # scorers, which would pick at random.
        defaults = yaml.safe_load(registry.defaults.config_yaml)
        return _parse_document(defaults, registry, f"{origin} (empty: the defaults)", strict)
    return _parse_document(document, registry, origin, strict)


def _read_source(source: str | pathlib.Path) -> tuple[str, str]:
    if isinstance(source, pathlib.Path):
        try:
            return source.read_text(encoding="utf-8"), str(source)
        except OSError as exc:
            raise ConfigError(f"cannot read config file {source}: {exc.strerror}") from None
    # A one-line string without YAML structure is a path; YAML text has a newline or colon.
    if "\n" not in source and ":" not in source:
        path = pathlib.Path(source)
        try:
            return path.read_text(encoding="utf-8"), str(path)
        except OSError as exc:
            raise ConfigError(f"cannot read config file {source}: {exc.strerror}") from None
    return source, "<config text>"


def _fail(origin: str, message: str) -> ConfigError:
    return ConfigError(f"{origin}: {message}")


def _parse_document(
    document: object, registry: Registry, origin: str, strict: bool = False
) -> PickerConfig:
    if document is None:
        document = {}
    if not isinstance(document, Mapping):
        raise _fail(origin, "the document must be a mapping (apiVersion, kind, plugins, ...)")
    unknown = [k for k in document if k not in KNOWN_SECTIONS]
    if unknown:
        raise _fail(
            origin,
            f"unknown top-level field {unknown[0]!r} (known: {', '.join(KNOWN_SECTIONS)})",
        )
    for alias, current in SECTION_ALIASES.items():
        if alias in document and current in document:
            raise _fail(origin, f"{alias!r} and {current!r} are the same section; give one")
    aliased = tuple(a for a in SECTION_ALIASES if a in document)
    document = {SECTION_ALIASES.get(k, k): v for k, v in document.items()}
    api_version = document.get("apiVersion", API_VERSIONS[0])
    if api_version not in API_VERSIONS:
        raise _fail(
            origin,
            f"apiVersion {api_version!r} is not supported (use one of {', '.join(API_VERSIONS)})",
        )
    kind = document.get("kind", KIND)
    if kind != KIND:
        raise _fail(origin, f"kind {kind!r} is not supported (use {KIND})")
    # Gates first, as llm-d: they decide how the rest is read.
    feature_gates = _parse_feature_gates(document.get("featureGates"), origin)

    unknown_params: list[UnknownParameter] = []
    specs, defaulted = _parse_plugins(
        document.get("plugins"), registry, origin, None if strict else unknown_params
    )
    by_name = {s.name: s for s in specs}
    profiles, defaulted_profile = _parse_profiles(
        document.get("schedulingProfiles"), by_name, registry, origin
    )
    # Every profile needs a picker: add the registry's default picker to those without (llm-d
    # adds a max-score-picker).
    lacking = [p.name for p in profiles if not _has_kind(p, by_name, registry, Picker)]
    if lacking:
        picker = registry.defaults.picker
        if not picker:
            known = ", ".join(_types_of_kind(registry, Picker)) or "none registered"
            raise _fail(origin, f"profile {lacking[0]!r} has no picker (types: {known})")
        if picker not in by_name:
            spec = _make_spec(registry, picker, picker, None, "<default>", origin, None)
            specs.append(spec)
            by_name[spec.name] = spec
            defaulted.append(picker)
        profiles = [
            p
            if _has_kind(p, by_name, registry, Picker)
            else ProfileSpec(p.name, (*p.plugins, ProfilePluginRef(picker, 1.0)))
            for p in profiles
        ]
    handler = _resolve_profile_handler(specs, profiles, registry, origin, defaulted)
    if handler not in by_name:
        spec = _make_spec(registry, handler, handler, None, "<default>", origin, None)
        specs.append(spec)
        by_name[spec.name] = spec
    _check_single_profile_handler(by_name[handler], profiles, origin)
    if defaulted_profile:
        defaulted.append(f"schedulingProfiles[{DEFAULT_PROFILE}]")
    raw_saturation = document.get("saturationDetector")
    if (
        isinstance(raw_saturation, Mapping)
        and raw_saturation.get("pluginRef") == DEFAULT_SATURATION_DETECTOR
        and DEFAULT_SATURATION_DETECTOR not in by_name
    ):
        # llm-d injects its default detector when referenced but not defined.
        spec = _make_spec(
            registry,
            DEFAULT_SATURATION_DETECTOR,
            DEFAULT_SATURATION_DETECTOR,
            None,
            "saturationDetector (default detector)",
            origin,
            None,
        )
        specs.append(spec)
        by_name[spec.name] = spec
        defaulted.append(DEFAULT_SATURATION_DETECTOR)
    saturation, saturation_ref = _parse_saturation(raw_saturation, by_name, registry, origin)
    flow_control = _parse_flow_control(
        document.get("flowControl"), FLOW_CONTROL_GATE in feature_gates, by_name, registry, origin
    )
    _report_unknown_parameters(unknown_params, origin)
    return PickerConfig(
        api_version=str(api_version),
        plugins=tuple(specs),
        profiles=tuple(profiles),
        profile_handler=handler,
        registry=registry,
        saturation=saturation,
        saturation_detector_ref=saturation_ref,
        feature_gates=feature_gates,
        data_layer=_parse_data_layer(document.get("dataLayer"), by_name, registry, origin),
        flow_control=flow_control,
        parser_ref=_parse_parser(document.get("parser"), by_name, registry, origin),
        inactive_sections=tuple(k for k in INACTIVE_SECTIONS if k in document)
        + (
            ("flowControl",)
            if "flowControl" in document and FLOW_CONTROL_GATE not in feature_gates
            else ()
        ),
        aliased_sections=aliased,
        unknown_parameters=tuple(unknown_params),
        source=origin,
        defaulted=tuple(defaulted),
    )


def _report_unknown_parameters(found: list[UnknownParameter], origin: str) -> None:
    for item in found:
        key = (item.plugin_type, item.parameter)
        if key in _warned_unknown:
            continue
        _warned_unknown.add(key)
        log.warning(
            "%s: %s: parameter %r is not a parameter of %s; ignored (as llm-d does; "
            "--strict-config fails instead)",
            origin,
            item.where,
            item.parameter,
            item.plugin_type,
        )


def _make_spec(
    registry: Registry,
    type_name: str,
    name: str,
    raw_params: object,
    where: str,
    origin: str,
    unknown_sink: list[UnknownParameter] | None,
) -> PluginSpec:
    plugin_type = registry.get(type_name)
    if plugin_type is None:
        raise _fail(
            origin,
            f"{where}: unknown plugin type {type_name!r} "
            f"(known: {', '.join(registry.type_names())})",
        )
    on_unknown = None
    if unknown_sink is not None:
        sink = unknown_sink
        canonical = plugin_type.type_name

        def on_unknown(path: str) -> None:
            sink.append(UnknownParameter(canonical, path, where))

    try:
        params = Params(raw_params if raw_params is not None else None, "", on_unknown)  # type: ignore[arg-type]
        parsed = plugin_type.parse(params)
        params.finish()
    except ParamError as exc:
        raise _fail(origin, f"{where}: {exc}") from None
    return PluginSpec(
        name=name,
        type_name=plugin_type.type_name,
        parameters=parsed,
        where=where,
        declared_type=type_name,
    )


def _parse_plugins(
    raw: object, registry: Registry, origin: str, unknown_sink: list[UnknownParameter] | None
) -> tuple[list[PluginSpec], list[str]]:
    if raw is None:
        raw = []
    if not isinstance(raw, list):
        raise _fail(origin, "plugins must be a list")
    specs: list[PluginSpec] = []
    seen: dict[str, str] = {}
    for i, entry in enumerate(raw):
        if not isinstance(entry, Mapping):
            raise _fail(origin, f"plugins[{i}]: must be a mapping with type, name, parameters")
        extra = [k for k in entry if k not in ("type", "name", "parameters")]
        if extra:
            raise _fail(
                origin, f"plugins[{i}]: unknown field {extra[0]!r} (known: type, name, parameters)"
            )
        type_name = entry.get("type")
        if not isinstance(type_name, str) or not type_name:
            raise _fail(origin, f"plugins[{i}]: type is required")
        name = entry.get("name") or type_name
        if not isinstance(name, str):
            raise _fail(origin, f'plugins[{i}] (type "{type_name}"): name must be a string')
        where = f'plugins[{i}] (type "{type_name}")'
        if name in seen:
            raise _fail(origin, f"{where}: duplicate plugin name {name!r} (first in {seen[name]})")
        seen[name] = where
        specs.append(
            _make_spec(
                registry, type_name, name, entry.get("parameters"), where, origin, unknown_sink
            )
        )
    return specs, []


def _kind_of(spec: PluginSpec, registry: Registry) -> type:
    plugin_type: PluginType[Any] | None = registry.get(spec.type_name)
    assert plugin_type is not None  # validated in _make_spec
    return plugin_type.cls


def _types_of_kind(registry: Registry, kind: type) -> list[str]:
    """The registered type names whose plugins are a `kind` (for error messages)."""
    return [
        name
        for name in registry.type_names()
        if (t := registry.get(name)) is not None and issubclass(t.cls, kind)
    ]


def _has_kind(
    profile: ProfileSpec, by_name: Mapping[str, PluginSpec], registry: Registry, kind: type
) -> bool:
    return any(
        issubclass(_kind_of(by_name[ref.plugin_ref], registry), kind) for ref in profile.plugins
    )


def _parse_profiles(
    raw: object, by_name: Mapping[str, PluginSpec], registry: Registry, origin: str
) -> tuple[list[ProfileSpec], bool]:
    if raw is None or raw == []:
        # No profiles: one `default` profile with every filter, scorer and picker (as llm-d;
        # producers, data sources, parsers and the like act outside profiles).
        every = tuple(
            ProfilePluginRef(s.name, 1.0)
            for s in by_name.values()
            if issubclass(_kind_of(s, registry), Filter | Scorer | Picker)
        )
        return [ProfileSpec(DEFAULT_PROFILE, every)], True
    if not isinstance(raw, list):
        raise _fail(origin, "schedulingProfiles must be a list")
    profiles: list[ProfileSpec] = []
    names: set[str] = set()
    for i, entry in enumerate(raw):
        if not isinstance(entry, Mapping):
            raise _fail(origin, f"schedulingProfiles[{i}]: must be a mapping with name, plugins")
        extra = [k for k in entry if k not in ("name", "plugins")]
        if extra:
            raise _fail(
                origin,
                f"schedulingProfiles[{i}]: unknown field {extra[0]!r} (known: name, plugins)",
            )
        name = entry.get("name")
        if not isinstance(name, str) or not name:
            raise _fail(origin, f"schedulingProfiles[{i}]: name is required")
        where = f'schedulingProfiles[{i}] (name "{name}")'
        if name in names:
            raise _fail(origin, f"{where}: duplicate profile name")
        names.add(name)
        refs_raw = entry.get("plugins") or []
        if not isinstance(refs_raw, list):
            raise _fail(origin, f"{where}: plugins must be a list")
        refs: list[ProfilePluginRef] = []
        pickers = 0
        for j, ref in enumerate(refs_raw):
            at = f"{where}.plugins[{j}]"
            if not isinstance(ref, Mapping):
                raise _fail(origin, f"{at}: must be a mapping with pluginRef, weight")
            extra = [k for k in ref if k not in ("pluginRef", "weight")]
            if extra:
                raise _fail(origin, f"{at}: unknown field {extra[0]!r} (known: pluginRef, weight)")
            plugin_ref = ref.get("pluginRef")
            if not isinstance(plugin_ref, str) or not plugin_ref:
                raise _fail(origin, f"{at}: pluginRef is required")
            if plugin_ref not in by_name:
                raise _fail(
                    origin,
                    f"{at}: pluginRef {plugin_ref!r} names no plugin "
                    f"(defined: {', '.join(by_name) or 'none'})",
                )
            weight = ref.get("weight", 1)
            if weight is None:
                weight = 1
            if (
                isinstance(weight, bool)
                or not isinstance(weight, int | float)
                or not math.isfinite(weight)
                or weight < 0
            ):
                raise _fail(origin, f"{at} ({plugin_ref}): weight must be a finite number >= 0")
            kind = _kind_of(by_name[plugin_ref], registry)
            if issubclass(kind, ProfileHandler):
                raise _fail(
                    origin,
                    f"{at}: {plugin_ref!r} is a profile handler; it is not part of a profile",
                )
            if issubclass(kind, Picker):
                pickers += 1
                if pickers > 1:
                    raise _fail(origin, f"{at}: a profile takes one picker ({plugin_ref!r})")
            if any(r.plugin_ref == plugin_ref for r in refs):
                raise _fail(origin, f"{at}: {plugin_ref!r} appears twice in the profile")
            refs.append(ProfilePluginRef(plugin_ref, float(weight)))
        profiles.append(ProfileSpec(name, tuple(refs)))
    return profiles, False


def _resolve_profile_handler(
    specs: list[PluginSpec],
    profiles: list[ProfileSpec],
    registry: Registry,
    origin: str,
    defaulted: list[str],
) -> str:
    handlers = [s for s in specs if issubclass(_kind_of(s, registry), ProfileHandler)]
    if len(handlers) > 1:
        raise _fail(
            origin,
            f"{handlers[1].where}: only one profile handler may be configured "
            f"(also {handlers[0].where})",
        )
    if handlers:
        return handlers[0].name
    known = ", ".join(_types_of_kind(registry, ProfileHandler)) or "none registered"
    if len(profiles) > 1:
        raise _fail(
            origin,
            f"{len(profiles)} scheduling profiles need a profile handler "
            f"(add one to plugins; types: {known})",
        )
    handler = registry.defaults.profile_handler
    if not handler:
        raise _fail(
            origin, f"no profile handler is configured (add one to plugins; types: {known})"
        )
    defaulted.append(handler)
    return handler


# llm-d rejects this handler type with more than one profile (by type, as here).
SINGLE_PROFILE_HANDLER = "single-profile-handler"


def _check_single_profile_handler(
    handler: PluginSpec, profiles: list[ProfileSpec], origin: str
) -> None:
    if handler.type_name == SINGLE_PROFILE_HANDLER and len(profiles) > 1:
        raise _fail(
            origin,
            f"{handler.where}: {SINGLE_PROFILE_HANDLER} cannot run {len(profiles)} scheduling "
            "profiles (configure a multi-profile handler such as pd-profile-handler)",
        )


def _has_role(spec: PluginSpec, role: str, registry: Registry) -> bool:
    return spec.type_name in ROLE_TYPES.get(role, ()) or spec.type_name in registry.role_types(role)


def _ref(
    raw: object,
    field_name: str,
    role: str,
    by_name: Mapping[str, PluginSpec],
    registry: Registry,
    origin: str,
    where: str,
) -> str:
    """A `pluginRef` that must name a defined plugin of `role`."""
    if not isinstance(raw, str) or not raw:
        raise _fail(origin, f"{where}: {field_name} must be a plugin name")
    spec = by_name.get(raw)
    if spec is None:
        raise _fail(
            origin,
            f"{where}: {field_name} {raw!r} names no plugin "
            f"(defined: {', '.join(by_name) or 'none'})",
        )
    if not _has_role(spec, role, registry):
        known = sorted({*ROLE_TYPES.get(role, ()), *registry.role_types(role)})
        raise _fail(
            origin,
            f"{where}: {field_name} {raw!r} is a {spec.type_name}, not a {role} "
            f"(types: {', '.join(known)})",
        )
    return raw


def _mapping(raw: object, section: str, known: tuple[str, ...], origin: str) -> Mapping[str, Any]:
    """A section that must be a mapping of `known` fields (llm-d decodes strictly)."""
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise _fail(origin, f"{section} must be a mapping ({', '.join(known)})")
    extra = [k for k in raw if k not in known]
    if extra:
        raise _fail(origin, f"{section}: unknown field {extra[0]!r} (known: {', '.join(known)})")
    return raw


_SATURATION_THRESHOLDS = (
    "queueDepthThreshold",
    "kvCacheUtilThreshold",
    "metricsStalenessThreshold",
)


def _parse_saturation(
    raw: object, by_name: Mapping[str, PluginSpec], registry: Registry, origin: str
) -> tuple[SaturationConfig, str]:
    """Both forms: llm-d's `{pluginRef: <detector plugin>}` and GIE's thresholds."""
    if isinstance(raw, Mapping) and "pluginRef" in raw:
        section = _mapping(raw, "saturationDetector", ("pluginRef",), origin)
        ref = _ref(
            section["pluginRef"],
            "pluginRef",
            "saturation-detector",
            by_name,
            registry,
            origin,
            "saturationDetector",
        )
        return SaturationConfig(), ref
    try:
        params = Params(raw, "saturationDetector")  # type: ignore[arg-type]
        config = SaturationConfig(
            queue_depth_threshold=params.integer("queueDepthThreshold", 5, min=0),
            kv_cache_util_threshold=params.number(
                "kvCacheUtilThreshold", 0.8, min=0.0, max=1.0, min_exclusive=True
            ),
            metrics_staleness_threshold_s=params.duration("metricsStalenessThreshold", 0.2),
        )
        params.finish()
    except ParamError as exc:
        raise _fail(
            origin,
            f"saturationDetector: {exc} (forms: pluginRef, or {', '.join(_SATURATION_THRESHOLDS)})",
        ) from None
    return config, ""


def _parse_feature_gates(raw: object, origin: str) -> frozenset[str]:
    # llm-d writes a list of gate names; a mapping of name -> bool is accepted too.
    if raw is None:
        return frozenset()
    if isinstance(raw, list) and all(isinstance(g, str) for g in raw):
        gates = frozenset(raw)
    elif isinstance(raw, Mapping) and all(
        isinstance(k, str) and isinstance(v, bool) for k, v in raw.items()
    ):
        gates = frozenset(k for k, v in raw.items() if v)
        raw = list(raw)
    else:
        raise _fail(origin, "featureGates must be a list of gate names")
    for gate in raw:
        if gate not in FEATURE_GATES:
            raise _fail(
                origin,
                f"feature gate {gate!r} is unknown (known: {', '.join(FEATURE_GATES)})",
            )
    return gates


def _parse_data_layer(
    raw: object, by_name: Mapping[str, PluginSpec], registry: Registry, origin: str
) -> DataLayerConfig | None:
    if raw is None:
        return None
    section = _mapping(raw, "dataLayer", ("injectDefaults", "sources", "discovery"), origin)
    inject = section.get("injectDefaults", True)
    if not isinstance(inject, bool):
        raise _fail(origin, "dataLayer.injectDefaults must be true or false")
    sources_raw = section.get("sources") or []
    if not isinstance(sources_raw, list):
        raise _fail(origin, "dataLayer.sources must be a list")
    sources: list[DataSourceSpec] = []
    for i, entry in enumerate(sources_raw):
        where = f"dataLayer.sources[{i}]"
        source = _mapping(entry, where, ("pluginRef", "extractors"), origin)
        ref = _ref(
            source.get("pluginRef"), "pluginRef", "data-source", by_name, registry, origin, where
        )
        extractors_raw = source.get("extractors") or []
        if not isinstance(extractors_raw, list):
            raise _fail(origin, f"{where}.extractors must be a list")
        extractors: list[str] = []
        for j, extractor in enumerate(extractors_raw):
            at = f"{where}.extractors[{j}]"
            if not isinstance(extractor, Mapping):
                raise _fail(origin, f"{at}: must be a mapping with pluginRef")
            item = _mapping(extractor, at, ("pluginRef",), origin)
            extractors.append(
                _ref(
                    item.get("pluginRef"),
                    "pluginRef",
                    "data-extractor",
                    by_name,
                    registry,
                    origin,
                    at,
                )
            )
        sources.append(DataSourceSpec(ref, tuple(extractors)))
    discovery_ref = ""
    if section.get("discovery") is not None:
        discovery = _mapping(section["discovery"], "dataLayer.discovery", ("pluginRef",), origin)
        discovery_ref = _ref(
            discovery.get("pluginRef"),
            "pluginRef",
            "data-source",
            by_name,
            registry,
            origin,
            "dataLayer.discovery",
        )
    return DataLayerConfig(inject, tuple(sources), discovery_ref)


def _parse_parser(
    raw: object, by_name: Mapping[str, PluginSpec], registry: Registry, origin: str
) -> str:
    if raw is None:
        return ""
    if isinstance(raw, Mapping) and "parser" in raw:  # requestHandling: {parser: {pluginRef}}
        raw = _mapping(raw, "requestHandling", ("parser",), origin)["parser"]
    section = _mapping(raw, "parser", ("pluginRef",), origin)
    return _ref(
        section.get("pluginRef"), "pluginRef", "parser", by_name, registry, origin, "parser"
    )


# Kubernetes resource quantities as llm-d's flowControl takes them (`1024`, `1Gi`, `500M`).
_QUANTITY = re.compile(
    r"^([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE]([+-]?[0-9]+))?(Ki|Mi|Gi|Ti|Pi|Ei|m|k|M|G|T|P|E)?$"
)
_QUANTITY_UNITS = {
    None: 1.0,
    "m": 1e-3,
    "k": 1e3,
    "M": 1e6,
    "G": 1e9,
    "T": 1e12,
    "P": 1e15,
    "E": 1e18,
    "Ki": 2.0**10,
    "Mi": 2.0**20,
    "Gi": 2.0**30,
    "Ti": 2.0**40,
    "Pi": 2.0**50,
    "Ei": 2.0**60,
}


def _quantity(raw: object, where: str, origin: str) -> int | None:
    if raw is None:
        return None
    if isinstance(raw, bool):
        raise _fail(origin, f"{where} must be a quantity such as 1024 or 1Gi, got {raw!r}")
    if isinstance(raw, int | float):
        value = float(raw)
    elif isinstance(raw, str) and (m := _QUANTITY.match(raw.strip())):
        value = float(m.group(1)) * 10.0 ** int(m.group(2) or 0) * _QUANTITY_UNITS[m.group(3)]
    else:
        raise _fail(origin, f"{where} must be a quantity such as 1024 or 1Gi, got {raw!r}")
    if not math.isfinite(value) or value < 0:
        raise _fail(origin, f"{where} must be a non-negative quantity, got {raw!r}")
    return math.ceil(value)  # as Quantity.Value(): rounded up to an integer


_BAND_FIELDS = ("priority", "maxBytes", "maxRequests", "fairnessPolicyRef", "orderingPolicyRef")


def _parse_band(
    raw: object,
    where: str,
    enabled: bool,
    by_name: Mapping[str, PluginSpec],
    registry: Registry,
    origin: str,
    *,
    needs_priority: bool,
) -> PriorityBandSpec:
    band = _mapping(raw, where, _BAND_FIELDS, origin)
    priority = band.get("priority", 0)
    if needs_priority and "priority" not in band:
        raise _fail(origin, f"{where}: priority is required")
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise _fail(origin, f"{where}.priority must be an integer, got {priority!r}")
    refs: dict[str, str] = {}
    for field_name, role, default in (
        ("orderingPolicyRef", "ordering-policy", DEFAULT_ORDERING_POLICY),
        ("fairnessPolicyRef", "fairness-policy", DEFAULT_FAIRNESS_POLICY),
    ):
        value = band.get(field_name) or ""
        if not isinstance(value, str):
            raise _fail(origin, f"{where}.{field_name} must be a plugin name")
        if value and enabled:
            # llm-d resolves references only with the gate on; so do we.
            value = _ref(value, field_name, role, by_name, registry, origin, where)
        refs[field_name] = value or default
    return PriorityBandSpec(
        priority=priority,
        max_bytes=_quantity(band.get("maxBytes"), f"{where}.maxBytes", origin),
        max_requests=_quantity(band.get("maxRequests"), f"{where}.maxRequests", origin),
        fairness_policy_ref=refs["fairnessPolicyRef"],
        ordering_policy_ref=refs["orderingPolicyRef"],
    )


def _parse_flow_control(
    raw: object,
    enabled: bool,
    by_name: Mapping[str, PluginSpec],
    registry: Registry,
    origin: str,
) -> FlowControlConfig | None:
    if raw is None:
        return FlowControlConfig(enabled=True) if enabled else None
    section = _mapping(
        raw,
        "flowControl",
        (
            "maxBytes",
            "maxRequests",
            "defaultRequestTTL",
            "defaultPriorityBand",
            "priorityBands",
            "usageLimitPolicyPluginRef",
        ),
        origin,
    )
    ttl: float | None = None
    if section.get("defaultRequestTTL") is not None:
        try:
            ttl = Params(section, "flowControl").duration("defaultRequestTTL", 0.0, positive=False)
        except ParamError as exc:
            raise _fail(origin, str(exc)) from None
    default_band = None
    if section.get("defaultPriorityBand") is not None:
        default_band = _parse_band(
            section["defaultPriorityBand"],
            "flowControl.defaultPriorityBand",
            enabled,
            by_name,
            registry,
            origin,
            needs_priority=False,
        )
    bands_raw = section.get("priorityBands") or []
    if not isinstance(bands_raw, list):
        raise _fail(origin, "flowControl.priorityBands must be a list")
    bands: list[PriorityBandSpec] = []
    seen: set[int] = set()
    for i, entry in enumerate(bands_raw):
        band = _parse_band(
            entry,
            f"flowControl.priorityBands[{i}]",
            enabled,
            by_name,
            registry,
            origin,
            needs_priority=False,
        )
        if band.priority in seen:
            raise _fail(
                origin, f"flowControl.priorityBands[{i}]: duplicate priority level {band.priority}"
            )
        seen.add(band.priority)
        bands.append(band)
    usage = section.get("usageLimitPolicyPluginRef") or ""
    if not isinstance(usage, str):
        raise _fail(origin, "flowControl.usageLimitPolicyPluginRef must be a plugin name")
    if usage and enabled:
        usage = _ref(
            usage,
            "usageLimitPolicyPluginRef",
            "usage-limit-policy",
            by_name,
            registry,
            origin,
            "flowControl",
        )
    return FlowControlConfig(
        enabled=enabled,
        max_bytes=_quantity(section.get("maxBytes"), "flowControl.maxBytes", origin),
        max_requests=_quantity(section.get("maxRequests"), "flowControl.maxRequests", origin),
        default_request_ttl_s=ttl,
        default_priority_band=default_band,
        priority_bands=tuple(bands),
        usage_limit_policy_ref=usage or DEFAULT_USAGE_LIMIT_POLICY,
    )


def describe_config(config: PickerConfig) -> str:
    """The effective configuration after defaulting, one line per item, for start-up logs."""
    lines = [f"EndpointPickerConfig from {config.source} ({config.api_version})"]
    for spec in config.plugins:
        alias = (
            f" (as {spec.declared_type})" if spec.declared_type not in ("", spec.type_name) else ""
        )
        lines.append(f"  plugin {spec.name}: {spec.type_name}{alias} {spec.parameters!r}")
    for profile in config.profiles:
        refs = ", ".join(f"{r.plugin_ref}*{r.weight:g}" for r in profile.plugins)
        lines.append(f"  profile {profile.name}: {refs}")
    lines.append(f"  profile handler: {config.profile_handler}")
    sat = config.saturation
    lines.append(
        f"  saturation: queueDepthThreshold={sat.queue_depth_threshold} "
        f"kvCacheUtilThreshold={sat.kv_cache_util_threshold:g} "
        f"metricsStalenessThreshold={sat.metrics_staleness_threshold_s:g}s"
    )
    if config.saturation_detector_ref:
        lines.append(f"  saturation detector: {config.saturation_detector_ref}")
    if config.parser_ref:
        lines.append(f"  parser: {config.parser_ref}")
    if config.data_layer is not None:
        sources = ", ".join(
            f"{s.plugin_ref}->[{', '.join(s.extractor_refs)}]" for s in config.data_layer.sources
        )
        lines.append(
            f"  dataLayer: sources [{sources}] injectDefaults={config.data_layer.inject_defaults}"
        )
    if config.flow_control is not None:
        fc = config.flow_control
        lines.append(
            f"  flowControl ({'gate on' if fc.enabled else 'gate off: ignored, as llm-d'}): "
            f"maxBytes={fc.max_bytes} maxRequests={fc.max_requests} "
            f"priorityBands={[b.priority for b in fc.priority_bands]}"
        )
    if config.feature_gates:
        lines.append(f"  feature gates: {', '.join(sorted(config.feature_gates))}")
    if config.defaulted:
        lines.append(f"  defaulted: {', '.join(config.defaulted)}")
    if config.aliased_sections:
        lines.append(f"  older section names: {', '.join(config.aliased_sections)}")
    if config.unknown_parameters:
        unknown = ", ".join(f"{u.plugin_type}.{u.parameter}" for u in config.unknown_parameters)
        lines.append(f"  unknown parameters (ignored): {unknown}")
    return "\n".join(lines)
