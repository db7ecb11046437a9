"""EndpointPickerConfig: load, validate and default llm-d's YAML.

Everything is checked here, before any plugin is built: the document shape, each plugin's
type and parameters (through its registered parser), each profile's references. Errors name
the entry (`plugins[2] (type "queue-scorer"): parameter "foo": unknown parameter ...`).

The plugin types, and what a config that leaves things out defaults to, come from the
`Registry` the caller passes (`epp.plugins.default_registry()` for the built-ins)."""

from __future__ import annotations

import math
import pathlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from epp.errors import EPPError
from epp.framework.params import ParamError, Params
from epp.framework.plugin import Picker, ProfileHandler
from epp.framework.registry import PluginType, Registry

API_VERSIONS = ("llm-d.ai/v1alpha1", "inference.networking.x-k8s.io/v1alpha1")
KIND = "EndpointPickerConfig"
DEFAULT_PROFILE = "default"

# Sections of llm-d's format this picker does not implement; accepted and listed in
# `PickerConfig.ignored_sections` so the caller can log them.
IGNORED_SECTIONS = ("data", "flowControl", "parser", "requestHandling")
KNOWN_SECTIONS = (
    "apiVersion",
    "kind",
    "plugins",
    "schedulingProfiles",
    "saturationDetector",
    "featureGates",
    *IGNORED_SECTIONS,
)


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
class PickerConfig:
    api_version: str
    plugins: tuple[PluginSpec, ...]
    profiles: tuple[ProfileSpec, ...]
    profile_handler: str  # plugin name
    # The registry the plugins were parsed with; `build_scheduler` builds them with it.
    registry: Registry = field(compare=False, repr=False)
    saturation: SaturationConfig = SaturationConfig()
    feature_gates: frozenset[str] = frozenset()
    ignored_sections: tuple[str, ...] = ()
    source: str = "<defaults>"
    # Plugins the loader added because the config left them out (llm-d's defaulting).
    defaulted: tuple[str, ...] = field(default_factory=tuple)

    def plugin(self, name: str) -> PluginSpec:
        for spec in self.plugins:
            if spec.name == name:
                return spec
        raise KeyError(name)


def load_config(source: str | pathlib.Path | None, registry: Registry) -> PickerConfig:
    """Parse an EndpointPickerConfig against `registry`'s plugin types. `None` gives the
    registry's default config; a `Path`, or a string that names an existing file, is read;
    any other string is the YAML text itself."""
    if source is None or (isinstance(source, str) and not source.strip()):
        # No config, or empty config text (an unset --config-text): the defaults.
        defaults = yaml.safe_load(registry.defaults.config_yaml)
        return _parse_document(defaults, registry, "<defaults>")
    text, origin = _read_source(source)
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{origin}: invalid YAML: {exc}") from None
    if document is None:
        # An empty file (or only comments) means the defaults, never a profile without
        # scorers, which would pick at random.
        defaults = yaml.safe_load(registry.defaults.config_yaml)
        return _parse_document(defaults, registry, f"{origin} (empty: the defaults)")
    return _parse_document(document, registry, origin)


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


def _parse_document(document: object, registry: Registry, origin: str) -> PickerConfig:
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
    api_version = document.get("apiVersion", API_VERSIONS[0])
    if api_version not in API_VERSIONS:
        raise _fail(
            origin, f"apiVersion {api_version!r} is not supported (use {' or '.join(API_VERSIONS)})"
        )
    kind = document.get("kind", KIND)
    if kind != KIND:
        raise _fail(origin, f"kind {kind!r} is not supported (use {KIND})")

    specs, defaulted = _parse_plugins(document.get("plugins"), registry, origin)
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
            spec = _make_spec(registry, picker, picker, None, "<default>", origin)
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
        spec = _make_spec(registry, handler, handler, None, "<default>", origin)
        specs.append(spec)
    if defaulted_profile:
        defaulted.append(f"schedulingProfiles[{DEFAULT_PROFILE}]")
    return PickerConfig(
        api_version=str(api_version),
        plugins=tuple(specs),
        profiles=tuple(profiles),
        profile_handler=handler,
        registry=registry,
        saturation=_parse_saturation(document.get("saturationDetector"), origin),
        feature_gates=_parse_feature_gates(document.get("featureGates"), origin),
        ignored_sections=tuple(k for k in IGNORED_SECTIONS if k in document),
        source=origin,
        defaulted=tuple(defaulted),
    )


def _make_spec(
    registry: Registry,
    type_name: str,
    name: str,
    raw_params: object,
    where: str,
    origin: str,
) -> PluginSpec:
    plugin_type = registry.get(type_name)
    if plugin_type is None:
        raise _fail(
            origin,
            f"{where}: unknown plugin type {type_name!r} "
            f"(known: {', '.join(registry.type_names())})",
        )
    try:
        params = Params(raw_params if raw_params is not None else None)  # type: ignore[arg-type]
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
    raw: object, registry: Registry, origin: str
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
        specs.append(_make_spec(registry, type_name, name, entry.get("parameters"), where, origin))
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
        # No profiles: one `default` profile with every plugin but profile handlers.
        every = tuple(
            ProfilePluginRef(s.name, 1.0)
            for s in by_name.values()
            if not issubclass(_kind_of(s, registry), ProfileHandler)
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


def _parse_saturation(raw: object, origin: str) -> SaturationConfig:
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
        raise _fail(origin, f"saturationDetector: {exc}") from None
    return config


def _parse_feature_gates(raw: object, origin: str) -> frozenset[str]:
    # llm-d writes a list of gate names; a mapping of name -> bool is accepted too.
    if raw is None:
        return frozenset()
    if isinstance(raw, list) and all(isinstance(g, str) for g in raw):
        return frozenset(raw)
    if isinstance(raw, Mapping) and all(
        isinstance(k, str) and isinstance(v, bool) for k, v in raw.items()
    ):
        return frozenset(k for k, v in raw.items() if v)
    raise _fail(origin, "featureGates must be a list of gate names")


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
    if config.feature_gates:
        lines.append(f"  feature gates: {', '.join(sorted(config.feature_gates))}")
    if config.defaulted:
        lines.append(f"  defaulted: {', '.join(config.defaulted)}")
    if config.ignored_sections:
        lines.append(f"  ignored sections: {', '.join(config.ignored_sections)}")
    return "\n".join(lines)
