"""Filters by P/D role and by labels."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from epp.endpoints import ROLE_LABEL
from epp.framework.cycle import CycleState
from epp.framework.params import ParamError, Params
from epp.framework.plugin import Filter
from epp.framework.registry import BuildContext, PluginType, Registry
from epp.plugins.common import no_parameters
from epp.types import Endpoint, LLMRequest, Role


class DecodeFilter(Filter):
    """Endpoints that decode: role `decode` or `both`."""

    type_name = "decode-filter"
    roles = frozenset({Role.DECODE, Role.BOTH})

    def filter(
        self, cycle: CycleState, request: LLMRequest, endpoints: list[Endpoint]
    ) -> list[Endpoint]:
        roles = self.roles
        return [e for e in endpoints if e.role in roles]


class PrefillFilter(DecodeFilter):
    """Endpoints that prefill: label `llm-d.ai/role` says prefill, both, prefill-decode,
    encode-prefill or encode-prefill-decode. Unlike the decode filter, an endpoint without the
    label is not a prefill worker (as llm-d's: a pool without role labels never disaggregates
    by accident)."""

    type_name = "prefill-filter"
    roles = frozenset({Role.PREFILL, Role.BOTH})

    def filter(
        self, cycle: CycleState, request: LLMRequest, endpoints: list[Endpoint]
    ) -> list[Endpoint]:
        roles = self.roles
        return [e for e in endpoints if e.role in roles and ROLE_LABEL in e.labels]


# llm-d's role values that include encoding (E/P/D disaggregation).
ENCODE_ROLES = frozenset({"encode", "encode-prefill", "encode-prefill-decode"})


class EncodeFilter(Filter):
    """Endpoints that encode multimodal inputs: label `llm-d.ai/role` is `encode`,
    `encode-prefill` or `encode-prefill-decode` (an endpoint without the label does not)."""

    type_name = "encode-filter"

    def filter(
        self, cycle: CycleState, request: LLMRequest, endpoints: list[Endpoint]
    ) -> list[Endpoint]:
        return [e for e in endpoints if e.labels.get(ROLE_LABEL) in ENCODE_ROLES]


_OPERATORS = ("In", "NotIn", "Exists", "DoesNotExist")


@dataclass(frozen=True)
class LabelRequirement:
    key: str
    operator: str
    values: frozenset[str]

    def matches(self, labels: Mapping[str, str]) -> bool:
        present = self.key in labels
        if self.operator == "In":
            return present and labels[self.key] in self.values
        if self.operator == "NotIn":
            return not present or labels[self.key] not in self.values
        if self.operator == "Exists":
            return present
        return not present


@dataclass(frozen=True)
class LabelSelector:
    """A Kubernetes label selector: all of matchLabels and matchExpressions (AND)."""

    requirements: tuple[LabelRequirement, ...]

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(r.matches(labels) for r in self.requirements)


def _parse_selector(params: Params) -> LabelSelector:
    reqs = [
        LabelRequirement(k, "In", frozenset({v}))
        for k, v in sorted(params.string_map("matchLabels").items())
    ]
    for i, raw in enumerate(params.items("matchExpressions")):
        expr = Params(raw, f"matchExpressions[{i}]") if isinstance(raw, Mapping) else None
        if expr is None:
            raise params.fail(f"matchExpressions[{i}]", "must be a mapping")
        key = expr.string("key", "")
        if not key:
            raise expr.fail("key", "is required")
        operator = expr.string("operator", "", choices=_OPERATORS)
        values = expr.string_list("values")
        if operator in ("In", "NotIn") and not values:
            raise expr.fail("values", f"must not be empty for operator {operator}")
        if operator in ("Exists", "DoesNotExist") and values:
            raise expr.fail("values", f"must be empty for operator {operator}")
        expr.finish()
        reqs.append(LabelRequirement(key, operator, frozenset(values)))
    if not reqs:
        raise ParamError(
            'parameter "matchLabels": a selector needs matchLabels or matchExpressions'
        )
    return LabelSelector(tuple(reqs))


class LabelSelectorFilter(Filter):
    type_name = "label-selector-filter"

    def __init__(self, name: str, selector: LabelSelector) -> None:
        super().__init__(name)
        self.selector = selector

    def filter(
        self, cycle: CycleState, request: LLMRequest, endpoints: list[Endpoint]
    ) -> list[Endpoint]:
        return [e for e in endpoints if self.selector.matches(e.labels)]


@dataclass(frozen=True)
class ByLabelParams:
    label: str
    valid_values: frozenset[str]
    allows_no_label: bool


def _parse_by_label(params: Params) -> ByLabelParams:
    label = params.string("label", "")
    if not label:
        raise params.fail("label", "is required")
    values = params.string_list("validValues")
    allows = params.boolean("allowsNoLabel", False)
    if not values and not allows:
        raise params.fail("validValues", "must not be empty unless allowsNoLabel is true")
    return ByLabelParams(label, frozenset(values), allows)


class ByLabelFilter(Filter):
    """Endpoints whose `label` is one of `validValues` (or absent, with allowsNoLabel)."""

    type_name = "by-label"

    def __init__(self, name: str, params: ByLabelParams) -> None:
        super().__init__(name)
        self.params = params

    def filter(
        self, cycle: CycleState, request: LLMRequest, endpoints: list[Endpoint]
    ) -> list[Endpoint]:
        p = self.params
        out = []
        for e in endpoints:
            value = e.labels.get(p.label)
            if (value is None and p.allows_no_label) or (
                value is not None and value in p.valid_values
            ):
                out.append(e)
        return out


def register(registry: Registry) -> None:
    registry.register(
        PluginType(
            DecodeFilter.type_name,
            DecodeFilter,
            no_parameters,
            lambda name, _p, _c: DecodeFilter(name),
            "role decode or both",
        )
    )
    registry.register(
        PluginType(
            PrefillFilter.type_name,
            PrefillFilter,
            no_parameters,
            lambda name, _p, _c: PrefillFilter(name),
            "label llm-d.ai/role prefill-capable (unlabelled: not)",
        )
    )

    registry.register(
        PluginType(
            EncodeFilter.type_name,
            EncodeFilter,
            no_parameters,
            lambda name, _p, _c: EncodeFilter(name),
            "role encode (E/P/D)",
        )
    )

    def build_selector(name: str, sel: LabelSelector, _ctx: BuildContext) -> Filter:
        return LabelSelectorFilter(name, sel)

    registry.register(
        PluginType(
            LabelSelectorFilter.type_name,
            LabelSelectorFilter,
            _parse_selector,
            build_selector,
            "Kubernetes label selector",
        ),
        aliases=("by-label-selector",),
    )

    def build_by_label(name: str, p: ByLabelParams, _ctx: BuildContext) -> Filter:
        return ByLabelFilter(name, p)

    registry.register(
        PluginType(
            ByLabelFilter.type_name, ByLabelFilter, _parse_by_label, build_by_label, "label in set"
        )
    )
