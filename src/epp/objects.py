"""InferenceObjective and InferenceModelRewrite (`inference.networking.x-k8s.io/v1alpha2`):
the objects that tell the picker a request's priority and which model serves it.

- **InferenceObjective** `spec.priority` (unset: 0), `spec.poolRef`; a request names one in
  header `x-gateway-inference-objective` (by `metadata.name`). Negative priority is
  sheddable.
- **InferenceModelRewrite** `spec.poolRef`, `spec.rules[].matches[].model{type: Exact, value}`
  (no matches: every model), `spec.rules[].targets[]{modelRewrite, weight}`. Precedence as
  llm-d-router's datastore: an exact match over a generic rule; among several, the oldest
  rewrite (`metadata.creationTimestamp`, then name) and, within one, the first rule. A target
  is picked by weight (all weights 0 or unset: evenly); with a session key the pick is a
  hash of it (the same session always lands on the same target), else random.

`ObjectStore` merges sources (`kubernetes` watch, `file`, the `--objective` flag), each
replacing or patching its own objects; lookups go kubernetes, then file, then flag. Pure and
single-threaded (sources apply on the event loop). `ObjectsFileSource` watches a YAML file
holding such objects (a list, `items:`, or `---`-separated documents)."""

from __future__ import annotations

import hashlib
import logging
import os
import random
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from epp.errors import EPPError
from kvindex.filewatch import WatchedFile, poll_every

log = logging.getLogger(__name__)

GROUP = "inference.networking.x-k8s.io"
VERSION = "v1alpha2"
API_VERSION = f"{GROUP}/{VERSION}"
OBJECTIVE_KIND = "InferenceObjective"
REWRITE_KIND = "InferenceModelRewrite"
OBJECTIVES_PLURAL = "inferenceobjectives"
REWRITES_PLURAL = "inferencemodelrewrites"
# PoolObjectReference.group's default (the CRD's).
DEFAULT_POOL_GROUP = "inference.networking.k8s.io"
# What names the session for a deterministic target pick (the first present).
SESSION_HEADERS = ("x-session-token", "x-session-id", "x-llm-d-session-id")
SOURCE_ORDER = ("kubernetes", "file", "flag")


class ObjectError(EPPError, ValueError):
    """An object that cannot be used; the message names it and the field."""


@dataclass(frozen=True)
class PoolRef:
    name: str
    group: str = DEFAULT_POOL_GROUP


@dataclass(frozen=True)
class Objective:
    name: str
    priority: int = 0
    pool_ref: PoolRef | None = None


@dataclass(frozen=True)
class Target:
    model: str
    weight: int = 0


@dataclass(frozen=True)
class RewriteRule:
    models: tuple[str, ...]  # exact model names; empty: every model
    targets: tuple[Target, ...]


@dataclass(frozen=True)
class ModelRewrite:
    name: str
    rules: tuple[RewriteRule, ...]
    created: str = ""  # RFC 3339 creationTimestamp (sorts in time order)
    pool_ref: PoolRef | None = None


# --- parsing --------------------------------------------------------------------------------


def _mapping(value: object, where: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ObjectError(f"{where} must be a mapping")
    return value


def _pool_ref(spec: Mapping[str, Any], where: str, required: bool) -> PoolRef | None:
    raw = spec.get("poolRef")
    if raw is None:
        if required:
            raise ObjectError(f"{where}: spec.poolRef is required")
        return None
    ref = _mapping(raw, f"{where}: spec.poolRef")
    name = ref.get("name")
    if not isinstance(name, str) or not name:
        raise ObjectError(f"{where}: spec.poolRef.name must be a non-empty string")
    group = ref.get("group") or DEFAULT_POOL_GROUP
    if not isinstance(group, str):
        raise ObjectError(f"{where}: spec.poolRef.group must be a string")
    return PoolRef(name, group)


def _meta(obj: Mapping[str, Any], kind: str) -> tuple[str, str]:
    meta = _mapping(obj.get("metadata"), f"{kind}.metadata")
    name = meta.get("name")
    if not isinstance(name, str) or not name:
        raise ObjectError(f"{kind}: metadata.name must be a non-empty string")
    created = meta.get("creationTimestamp") or ""
    return name, str(created)


def objective_from_object(obj: Mapping[str, Any], pool_required: bool = True) -> Objective:
    name, _ = _meta(obj, OBJECTIVE_KIND)
    where = f"{OBJECTIVE_KIND} {name}"
    spec = _mapping(obj.get("spec"), f"{where}: spec")
    priority = spec.get("priority", 0)
    if priority is None:
        priority = 0
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise ObjectError(f"{where}: spec.priority must be an integer, got {priority!r}")
    if not -(2**31) <= priority < 2**31:
        raise ObjectError(f"{where}: spec.priority must be a 32-bit integer")
    return Objective(name, priority, _pool_ref(spec, where, pool_required))


def rewrite_from_object(obj: Mapping[str, Any], pool_required: bool = True) -> ModelRewrite:
    name, created = _meta(obj, REWRITE_KIND)
    where = f"{REWRITE_KIND} {name}"
    spec = _mapping(obj.get("spec"), f"{where}: spec")
    rules_raw = spec.get("rules") or []
    if not isinstance(rules_raw, list):
        raise ObjectError(f"{where}: spec.rules must be a list")
    rules: list[RewriteRule] = []
    for i, raw_rule in enumerate(rules_raw):
        at = f"{where}: spec.rules[{i}]"
        rule = _mapping(raw_rule, at)
        models: list[str] = []
        matches = rule.get("matches") or []
        if not isinstance(matches, list):
            raise ObjectError(f"{at}.matches must be a list")
        for j, raw_match in enumerate(matches):
            model = _mapping(_mapping(raw_match, f"{at}.matches[{j}]").get("model"), "model")
            kind = model.get("type") or "Exact"
            if kind != "Exact":
                raise ObjectError(f"{at}.matches[{j}].model.type must be Exact, got {kind!r}")
            value = model.get("value")
            if not isinstance(value, str) or not value:
                raise ObjectError(f"{at}.matches[{j}].model.value must be a non-empty string")
            models.append(value)
        targets: list[Target] = []
        targets_raw = rule.get("targets") or []
        if not isinstance(targets_raw, list):
            raise ObjectError(f"{at}.targets must be a list")
        for j, raw_target in enumerate(targets_raw):
            target = _mapping(raw_target, f"{at}.targets[{j}]")
            model_name = target.get("modelRewrite")
            if not isinstance(model_name, str) or not model_name:
                raise ObjectError(f"{at}.targets[{j}].modelRewrite must be a non-empty string")
            weight = target.get("weight", 0) or 0
            if isinstance(weight, bool) or not isinstance(weight, int) or not 0 <= weight <= 10**6:
                raise ObjectError(f"{at}.targets[{j}].weight must be an integer in [1, 1000000]")
            targets.append(Target(model_name, weight))
        weights = [t.weight for t in targets]
        if any(weights) and not all(weights):
            raise ObjectError(f"{at}.targets: set a weight on every target or on none")
        rules.append(RewriteRule(tuple(models), tuple(targets)))
    return ModelRewrite(name, tuple(rules), created, _pool_ref(spec, where, pool_required))


def parse_objects_document(text: str, origin: str = "<objects>") -> tuple[list[Any], list[Any]]:
    """(objectives, rewrites) from YAML: one or more documents, each an object, a list of
    objects or a `kind: List` with `items`. Other kinds are rejected."""
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        raise ObjectError(f"{origin}: invalid YAML: {exc}") from None
    flat: list[Any] = []
    for doc in docs:
        if isinstance(doc, list):
            flat.extend(doc)
        elif isinstance(doc, Mapping) and isinstance(doc.get("items"), list):
            flat.extend(doc["items"])
        else:
            flat.append(doc)
    objectives: list[Objective] = []
    rewrites: list[ModelRewrite] = []
    for i, obj in enumerate(flat):
        if not isinstance(obj, Mapping):
            raise ObjectError(f"{origin}: object {i} is not a mapping")
        kind = obj.get("kind")
        try:
            if kind == OBJECTIVE_KIND:
                objectives.append(objective_from_object(obj, pool_required=False))
            elif kind == REWRITE_KIND:
                rewrites.append(rewrite_from_object(obj, pool_required=False))
            else:
                raise ObjectError(
                    f"object {i}: kind must be {OBJECTIVE_KIND} or {REWRITE_KIND}, got {kind!r}"
                )
        except ObjectError as exc:
            raise ObjectError(f"{origin}: {exc}") from None
    return objectives, rewrites


# --- the store ------------------------------------------------------------------------------


@dataclass
class _Source:
    objectives: dict[str, Objective] = field(default_factory=dict)
    rewrites: dict[str, ModelRewrite] = field(default_factory=dict)


@dataclass(frozen=True)
class RewriteDecision:
    rewrite: str  # the InferenceModelRewrite's name
    model: str  # as requested
    target: str


class ObjectStore:
    """Objectives and rewrites by source, for the picker's pool (`pool` None: any pool)."""

    def __init__(
        self,
        pool: PoolRef | None = None,
        rng: random.Random | None = None,
        on_rewrite: Callable[[RewriteDecision], None] | None = None,
    ) -> None:
        self.pool = pool
        self.rng = rng or random.Random()
        self.on_rewrite = on_rewrite
        self._sources: dict[str, _Source] = {}
        self._rules: list[tuple[tuple[int, str, str, int], RewriteRule, str]] | None = None
        self.version = 0  # bumped on every change (tests wait on it)
        self._listeners: list[Callable[[], None]] = []

    def on_change(self, listener: Callable[[], None]) -> None:
        """Call `listener` after every change (the server re-publishes its readiness)."""
        self._listeners.append(listener)

    # -- updates ---------------------------------------------------------------------------

    def _mine(self, ref: PoolRef | None) -> bool:
        if self.pool is None or ref is None:
            return True
        # An empty group in the picker's own reference accepts either pool API group.
        return ref.name == self.pool.name and (not self.pool.group or ref.group == self.pool.group)

    def _source(self, name: str) -> _Source:
        return self._sources.setdefault(name, _Source())

    def _changed(self) -> None:
        self._rules = None
        self.version += 1
        for listener in self._listeners:
            listener()

    def replace(
        self,
        source: str,
        objectives: Iterable[Objective] | None = None,
        rewrites: Iterable[ModelRewrite] | None = None,
    ) -> None:
        """`source` now holds exactly these objectives (and/or rewrites; None keeps that
        kind as it is). Objects for other pools are dropped."""
        mine = self._source(source)
        if objectives is not None:
            mine.objectives = {o.name: o for o in objectives if self._mine(o.pool_ref)}
        if rewrites is not None:
            mine.rewrites = {r.name: r for r in rewrites if self._mine(r.pool_ref)}
        self._changed()

    def set_objective(self, source: str, objective: Objective) -> None:
        mine = self._source(source).objectives
        if self._mine(objective.pool_ref):
            mine[objective.name] = objective
        else:  # moved to another pool: no longer ours
            mine.pop(objective.name, None)
        self._changed()

    def delete_objective(self, source: str, name: str) -> None:
        self._source(source).objectives.pop(name, None)
        self._changed()

    def set_rewrite(self, source: str, rewrite: ModelRewrite) -> None:
        mine = self._source(source).rewrites
        if self._mine(rewrite.pool_ref):
            mine[rewrite.name] = rewrite
        else:
            mine.pop(rewrite.name, None)
        self._changed()

    def delete_rewrite(self, source: str, name: str) -> None:
        self._source(source).rewrites.pop(name, None)
        self._changed()

    # -- lookups ---------------------------------------------------------------------------

    def _ordered_sources(self) -> list[_Source]:
        known = [self._sources[s] for s in SOURCE_ORDER if s in self._sources]
        return known + [v for k, v in self._sources.items() if k not in SOURCE_ORDER]

    def objective(self, name: str) -> Objective | None:
        for source in self._ordered_sources():
            found = source.objectives.get(name)
            if found is not None:
                return found
        return None

    def objectives(self) -> dict[str, Objective]:
        merged: dict[str, Objective] = {}
        for source in reversed(self._ordered_sources()):
            merged.update(source.objectives)
        return merged

    def rewrites(self) -> dict[str, ModelRewrite]:
        merged: dict[str, ModelRewrite] = {}
        for source in reversed(self._ordered_sources()):
            merged.update(source.rewrites)
        return merged

    def _sorted_rules(self) -> list[tuple[tuple[int, str, str, int], RewriteRule, str]]:
        if self._rules is None:
            rules = []
            for rw in self.rewrites().values():
                for i, rule in enumerate(rw.rules):
                    # exact before generic, then oldest rewrite, then rule order
                    key = (0 if rule.models else 1, rw.created, rw.name, i)
                    rules.append((key, rule, rw.name))
            rules.sort(key=lambda entry: entry[0])
            self._rules = rules
        return self._rules

    @property
    def has_rewrites(self) -> bool:
        return bool(self._sorted_rules())

    def rule_for(self, model: str) -> tuple[RewriteRule, str] | None:
        for _key, rule, name in self._sorted_rules():
            if not rule.models or model in rule.models:
                return rule, name
        return None

    def rewrite(self, model: str, session_key: str | None = None) -> RewriteDecision | None:
        """The target for `model`, or None when no rule matches or the rule has no target."""
        found = self.rule_for(model)
        if found is None:
            return None
        rule, name = found
        target = pick_target(rule.targets, session_key, name, self.rng)
        if target is None:
            return None
        decision = RewriteDecision(name, model, target)
        if self.on_rewrite is not None:
            self.on_rewrite(decision)
        return decision


def pick_target(
    targets: tuple[Target, ...], session_key: str | None, salt: str, rng: random.Random
) -> str | None:
    """Weighted pick (all weights 0: evenly). A session key picks by its hash, so one session
    always gets the same target while the targets stay the same."""
    if not targets:
        return None
    weights = [t.weight for t in targets]
    total = sum(weights)
    if total == 0:
        weights, total = [1] * len(targets), len(targets)
    if session_key:
        digest = hashlib.blake2b(f"{salt}\x00{session_key}".encode(), digest_size=8).digest()
        point = int.from_bytes(digest, "big") % total
    else:
        point = rng.randrange(total)
    for target, weight in zip(targets, weights, strict=True):
        if point < weight:
            return target.model
        point -= weight
    return targets[-1].model


def session_key(headers: Mapping[str, str]) -> str | None:
    for name in SESSION_HEADERS:
        value = headers.get(name)
        if value:
            return value
    return None


# --- the file source ------------------------------------------------------------------------


class ObjectsFileSource:
    """A YAML file of InferenceObjective / InferenceModelRewrite objects, re-read when its
    mtime or size changes (on the event loop). A bad file keeps the last good objects; the
    error is logged once and reported to `on_error`."""

    SOURCE = "file"

    def __init__(
        self,
        path: str | os.PathLike[str],
        store: ObjectStore,
        on_error: Callable[[], None] | None = None,
        interval_s: float = 1.0,
    ) -> None:
        self.path = Path(path)
        self.store = store
        self.on_error = on_error or (lambda: None)
        self.interval_s = interval_s
        self.file = WatchedFile(self.path, self._parse)

    def _parse(self, text: str) -> tuple[list[Objective], list[ModelRewrite]]:
        return parse_objects_document(text, str(self.path))

    def poll(self) -> bool:
        return self.file.poll(self._loaded, self._failed)

    @property
    def synced(self) -> bool:
        """The file was read and parsed at least once (until then every request would get
        priority 0 and no rewrite: the picker reports itself not ready)."""
        return self.file.loads > 0

    def _loaded(self, value: tuple[list[Objective], list[ModelRewrite]]) -> None:
        objectives, rewrites = value
        self.store.replace(self.SOURCE, objectives, rewrites)
        log.info(
            "objects file %s: %d InferenceObjectives, %d InferenceModelRewrites",
            self.path,
            len(objectives),
            len(rewrites),
        )

    def _failed(self, message: str) -> None:
        log.error("keeping the last good objects: %s", message)
        self.on_error()

    async def run(self) -> None:
        await poll_every(self.poll, self.interval_s)
