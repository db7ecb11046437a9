"""Pickers: max-score, random, weighted-random (A-Res). `maxNumOfEndpoints` > 1 returns the
pick followed by fallbacks, in preference order."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from epp.framework.cycle import CycleState
from epp.framework.params import Params
from epp.framework.plugin import Picker, ScoredEndpoint
from epp.framework.registry import BuildContext, PluginType, Registry
from epp.types import Endpoint, LLMRequest


@dataclass(frozen=True)
class PickerParams:
    max_num_of_endpoints: int = 1


def _parse(params: Params) -> PickerParams:
    return PickerParams(params.integer("maxNumOfEndpoints", 1, min=1))


class _BasePicker(Picker):
    def __init__(self, name: str, params: PickerParams, rng: random.Random) -> None:
        super().__init__(name)
        self.max_num = params.max_num_of_endpoints
        self.rng = rng


class MaxScorePicker(_BasePicker):
    """Highest total score first; ties broken at random."""

    type_name = "max-score-picker"

    def pick(
        self, cycle: CycleState, request: LLMRequest, scored: list[ScoredEndpoint]
    ) -> list[Endpoint]:
        if not scored:
            return []
        if self.max_num == 1:
            best = -math.inf
            ties: list[ScoredEndpoint] = []
            for se in scored:
                s = se.score
                if s > best:
                    best = s
                    ties = [se]
                elif s == best:
                    ties.append(se)
            if not ties:  # every score NaN
                return [self.rng.choice(scored).endpoint]
            return [ties[0].endpoint if len(ties) == 1 else self.rng.choice(ties).endpoint]
        rand = self.rng.random
        ranked = sorted(scored, key=lambda se: (-_finite(se.score), rand()))
        return [se.endpoint for se in ranked[: self.max_num]]


def _finite(score: float) -> float:
    return score if score == score else -math.inf  # NaN last


class RandomPicker(_BasePicker):
    """Uniformly at random, ignoring scores."""

    type_name = "random-picker"

    def pick(
        self, cycle: CycleState, request: LLMRequest, scored: list[ScoredEndpoint]
    ) -> list[Endpoint]:
        k = min(self.max_num, len(scored))
        return [se.endpoint for se in self.rng.sample(scored, k)]


class WeightedRandomPicker(_BasePicker):
    """Probability proportional to score (A-Res reservoir keys u^(1/w)); uniform when no
    score is positive. Endpoints scoring 0 come after every positive one."""

    type_name = "weighted-random-picker"

    def pick(
        self, cycle: CycleState, request: LLMRequest, scored: list[ScoredEndpoint]
    ) -> list[Endpoint]:
        if not scored:
            return []
        rand = self.rng.random
        keyed: list[tuple[float, ScoredEndpoint]] = []
        any_positive = False
        for se in scored:
            w = se.score
            if w > 0.0 and math.isfinite(w):
                any_positive = True
                u = 1.0 - rand()  # (0, 1]
                # log(u)/w orders like u^(1/w) without underflow.
                keyed.append((math.log(u) / w, se))
            else:
                keyed.append((-math.inf, se))
        if not any_positive:
            k = min(self.max_num, len(scored))
            return [se.endpoint for se in self.rng.sample(scored, k)]
        if self.max_num == 1:
            return [max(keyed, key=lambda kv: kv[0])[1].endpoint]
        positives = sorted((kv for kv in keyed if kv[0] > -math.inf), key=lambda kv: -kv[0])
        rest = [kv[1] for kv in keyed if kv[0] == -math.inf]
        self.rng.shuffle(rest)
        ordered = [kv[1] for kv in positives] + rest
        return [se.endpoint for se in ordered[: self.max_num]]


def register(registry: Registry) -> None:
    def builder(cls: type[_BasePicker]) -> object:
        def build(name: str, params: PickerParams, ctx: BuildContext) -> Picker:
            return cls(name, params, ctx.deps.rng)

        return build

    for cls, summary, aliases in (
        (MaxScorePicker, "highest score, random tie-break", ("max-score",)),
        (RandomPicker, "uniform random", ("random",)),
        (WeightedRandomPicker, "random in proportion to score", ()),
    ):
        registry.register(
            PluginType(cls.type_name, cls, _parse, builder(cls), summary),  # type: ignore[arg-type]
            aliases=aliases,
        )
