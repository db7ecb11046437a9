"""Plugin types by name: a parameter parser (pure, run at config load so bad parameters fail
early) and a builder (run by `build_scheduler` with the injected dependencies).

The framework registers no types itself: whoever assembles a registry (`epp.plugins` for the
built-ins) registers them and says what the loader defaults to (`ConfigDefaults`)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from epp.framework.params import Params
from epp.framework.plugin import Plugin

if TYPE_CHECKING:
    from epp.framework.deps import SchedulerDeps
    from epp.framework.flowgate import FlowControlBuilder

P = TypeVar("P")


class BuildContext:
    """What a builder may use: the injected dependencies and, through `defer`, the other
    plugin instances by name once all are built (for plugins that reference each other)."""

    def __init__(self, deps: SchedulerDeps, profile_names: Iterable[str]) -> None:
        self.deps = deps
        self.profile_names = frozenset(profile_names)
        self.plugins: dict[str, Plugin] = {}
        self._deferred: list[Callable[[], None]] = []

    def defer(self, resolve: Callable[[], None]) -> None:
        self._deferred.append(resolve)

    def resolve(self) -> None:
        for fn in self._deferred:
            fn()
        self._deferred.clear()


@dataclass(frozen=True)
class PluginType(Generic[P]):
    type_name: str
    # The class the builder returns; decides the extension points at load time.
    cls: type[Plugin]
    parse: Callable[[Params], P]
    build: Callable[[str, P, BuildContext], Plugin]
    summary: str = ""


@dataclass(frozen=True)
class ConfigDefaults:
    """What `load_config` fills in where a config leaves it out (llm-d's defaulting). These
    name plugin types, so they come with the registry; empty means no defaulting (the loader
    then reports what is missing)."""

    config_yaml: str = ""  # the document used when there is no config (None or blank text)
    picker: str = ""  # plugin type added to every profile without a picker
    profile_handler: str = ""  # plugin type used when none is configured (one profile)


class Registry:
    def __init__(self, defaults: ConfigDefaults = ConfigDefaults()) -> None:
        self.defaults = defaults
        self._types: dict[str, PluginType[Any]] = {}
        self._aliases: dict[str, str] = {}
        # Config-section roles (`parser`, `data-source`, ...) beyond the loader's built-in
        # type names for them: type names a section may reference in that role.
        self._roles: dict[str, set[str]] = {}
        # Builds the flow-control gate for an enabled `flowControl` section (set by whoever
        # registers the flow-control policies; None: such a config fails to build).
        self.flow_control_builder: FlowControlBuilder | None = None

    def register(self, plugin_type: PluginType[Any], aliases: Iterable[str] = ()) -> None:
        if plugin_type.type_name in self._types or plugin_type.type_name in self._aliases:
            raise ValueError(f"plugin type {plugin_type.type_name!r} registered twice")
        self._types[plugin_type.type_name] = plugin_type
        for alias in aliases:
            self._aliases[alias] = plugin_type.type_name

    def get(self, type_name: str) -> PluginType[Any] | None:
        return self._types.get(self._aliases.get(type_name, type_name))

    def canonical(self, type_name: str) -> str:
        return self._aliases.get(type_name, type_name)

    def type_names(self) -> list[str]:
        return sorted(self._types)

    def aliases(self) -> dict[str, str]:
        return dict(self._aliases)

    def add_role(self, role: str, *type_names: str) -> None:
        """Let `type_names` be referenced where a config section wants a `role` (see
        `epp.framework.config.ROLE_TYPES` for the roles and their built-in types)."""
        self._roles.setdefault(role, set()).update(type_names)

    def role_types(self, role: str) -> frozenset[str]:
        return frozenset(self._roles.get(role, ()))
