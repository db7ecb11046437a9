"""Nothing a client sends makes the read API fail with anything but a ScoreRequestError
(which the edges turn into a 4xx with a reason): hypothesis over arbitrary JSON bodies, run
through the same decode + score path the HTTP handler uses."""

from __future__ import annotations

from typing import Any

import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from score_fixtures import Registry, deepseek

from kvindex.index import MemoryIndex
from kvindex.scoring import Scorer, ScoringConfig
from kvindex.service.score_api import ScoreMetrics, ScoreRequestError, ScoreService
from kvindex.service.score_http import ScoreBody

MODEL = "deepseek-ai/DeepSeek-V3"

scalars = st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.text(max_size=20)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)
fields = st.fixed_dictionaries(
    {},
    optional={
        "model": st.sampled_from([MODEL, "sql-lora", "nobody", ""]) | json_values,
        "token_ids": st.lists(st.integers(-5, 2**33), max_size=40) | json_values,
        "prompt": st.text(max_size=80) | json_values,
        "messages": st.lists(
            st.fixed_dictionaries(
                {}, optional={"role": st.sampled_from(["user", "system"]), "content": json_values}
            ),
            max_size=3,
        )
        | json_values,
        "tools": json_values,
        "engines": st.lists(st.text(max_size=12), max_size=3) | json_values,
        "lora": json_values,
        "cache_salt": json_values,
        "add_generation_prompt": json_values,
    },
)

SERVICE = ScoreService(
    Scorer(MemoryIndex(), ScoringConfig(max_prompt_tokens=64)),
    Registry({MODEL: deepseek()}, {"sql-lora": MODEL}),
    metrics=ScoreMetrics(CollectorRegistry()),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fields | json_values)
def test_any_body_is_scored_or_refused_with_a_reason(body: Any) -> None:
    raw = msgspec.json.encode(body)
    try:
        decoded = msgspec.json.decode(raw, type=ScoreBody)
    except msgspec.ValidationError:
        return  # the handler answers 400 bad_field
    try:
        result = SERVICE.score(decoded.query(), "http")
    except ScoreRequestError as exc:
        assert exc.reason
        assert exc.message
        return
    assert result.model == MODEL
    assert all(0.0 <= s.score <= 1.0 for s in result.scores)
