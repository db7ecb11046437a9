"""TTFT and TPOT models: one recursive-least-squares regression per endpoint and metric,
initialised from (and, until it has seen `min_samples`, blended with) a pooled regression
over all endpoints, plus an online upper-quantile estimate of each model's residual, so an
SLO check can ask "will this very likely be met" rather than "on average".

Features (`FEATURES`): a bias, uncached prompt tokens (thousands), waiting requests, running
requests, KV usage (0..1), prompt tokens (thousands), expected output tokens (thousands).
Pure arithmetic on lists: d = 7, an update is ~150 multiply-adds.

Optional per-feature lower bounds (`floors`) make it a projected least-squares fit: after each
update a coefficient below its floor is raised to it. A user of the model that compares
endpoints by predicted cost needs the coefficients to keep their physical sign (a cached
token can never make a request slower): a few noisy samples (a cache hit that happened to be
slow) otherwise fit a negative prefill cost, and the cheapest endpoint becomes the one that
does *not* hold the prompt."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

FEATURES = (
    "bias",
    "uncached_ktokens",
    "waiting",
    "running",
    "kv_usage",
    "prompt_ktokens",
    "output_ktokens",
)
DIM = len(FEATURES)
METRICS = ("ttft", "tpot")


def features(
    *,
    uncached_tokens: int,
    waiting: int,
    running: int,
    kv_usage: float,
    prompt_tokens: int,
    output_tokens: int,
) -> list[float]:
    return [
        1.0,
        uncached_tokens / 1000.0,
        float(waiting),
        float(running),
        kv_usage,
        prompt_tokens / 1000.0,
        output_tokens / 1000.0,
    ]


class RecursiveLeastSquares:
    """Exponentially weighted least squares, updated one sample at a time."""

    __slots__ = ("floors", "forgetting", "n", "p", "prior", "w")

    def __init__(
        self,
        dim: int = DIM,
        *,
        forgetting: float = 0.995,
        prior: float = 100.0,
        weights: Sequence[float] | None = None,
        floors: Sequence[float] | None = None,
    ) -> None:
        self.forgetting = forgetting
        self.prior = prior
        self.w = list(weights) if weights is not None else [0.0] * dim
        self.p = [[prior if i == j else 0.0 for j in range(dim)] for i in range(dim)]
        self.n = 0
        if floors is not None and len(floors) != dim:
            raise ValueError(f"floors: {len(floors)} values for {dim} features")
        self.floors = tuple(floors) if floors is not None else None
        self.project()

    def project(self) -> None:
        """Raise every coefficient below its floor to it (no-op without floors)."""
        floors = self.floors
        if floors is None:
            return
        w = self.w
        for i, floor in enumerate(floors):
            if w[i] < floor:
                w[i] = floor

    def predict(self, x: Sequence[float]) -> float:
        return sum(wi * xi for wi, xi in zip(self.w, x, strict=True))

    def update(self, x: Sequence[float], y: float) -> float:
        """Learn (x, y); returns the a-priori residual y - prediction."""
        p, lam, d = self.p, self.forgetting, len(self.w)
        px = [sum(row[j] * x[j] for j in range(d)) for row in p]
        denom = lam + sum(x[i] * px[i] for i in range(d))
        err = y - self.predict(x)
        if not (denom > 0.0 and math.isfinite(denom) and math.isfinite(err)):
            self._reset_covariance()
            return err if math.isfinite(err) else 0.0
        k = [v / denom for v in px]
        w = self.w
        for i in range(d):
            w[i] += k[i] * err
        inv = 1.0 / lam
        for i in range(d):
            row, ki = p[i], k[i]
            for j in range(d):
                row[j] = (row[j] - ki * px[j]) * inv
        self.project()
        # Bound the covariance: with little excitation it grows by 1/lam per step forever.
        if p[0][0] > 1e6 * self.prior:
            self._reset_covariance()
        self.n += 1
        return err

    def _reset_covariance(self) -> None:
        d = len(self.w)
        self.p = [[self.prior if i == j else 0.0 for j in range(d)] for i in range(d)]

    def copy(self) -> RecursiveLeastSquares:
        out = RecursiveLeastSquares(
            len(self.w), forgetting=self.forgetting, prior=self.prior, floors=self.floors
        )
        out.w = list(self.w)
        out.p = [list(row) for row in self.p]
        out.n = self.n
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"w": list(self.w), "p": [list(r) for r in self.p], "n": self.n}

    @classmethod
    def from_dict(
        cls,
        data: Mapping[str, Any],
        *,
        forgetting: float,
        prior: float,
        floors: Sequence[float] | None = None,
    ) -> RecursiveLeastSquares:
        w = [float(v) for v in data["w"]]
        p = [[float(v) for v in row] for row in data["p"]]
        if len(w) != DIM or len(p) != DIM or any(len(r) != DIM for r in p):
            raise ValueError(f"expected {DIM} features")
        out = cls(DIM, forgetting=forgetting, prior=prior, floors=floors)
        out.w, out.p, out.n = w, p, int(data["n"])
        out.project()  # a model saved without (or with other) floors
        return out


class QuantileTracker:
    """Online estimate of the q-quantile of a residual stream (stochastic approximation,
    step scaled by the running mean absolute residual so it adapts to the metric's scale)."""

    __slots__ = ("mad", "q", "value")

    def __init__(self, q: float, value: float = 0.0, mad: float = 0.0) -> None:
        self.q = q
        self.value = value
        self.mad = mad

    def update(self, residual: float) -> None:
        self.mad += 0.05 * (abs(residual) - self.mad)
        step = 0.02 * (self.mad + 1e-6)
        self.value += step * (self.q - (1.0 if residual < self.value else 0.0))


@dataclass(slots=True)
class LatencyPrediction:
    ttft_s: float
    tpot_s: float
    # Upper-quantile corrections (seconds) for an SLO check.
    ttft_margin_s: float
    tpot_margin_s: float


class _MetricModels:
    __slots__ = ("model", "residual")

    def __init__(self, model: RecursiveLeastSquares, q: float) -> None:
        self.model = model
        self.residual = QuantileTracker(q)


class LatencyModel:
    def __init__(
        self,
        *,
        forgetting: float = 0.995,
        prior: float = 100.0,
        min_samples: int = 10,
        quantile: float = 0.9,
        floors: Sequence[float] | None = None,
    ) -> None:
        # Per-feature lower bounds of every regression's coefficients (see the module doc);
        # not part of the saved settings: they belong to the model's user, not its data.
        self.floors = tuple(floors) if floors is not None else None
        self.forgetting = forgetting
        self.prior = prior
        self.min_samples = min_samples
        self.quantile = quantile
        self.pooled = {m: self._new(None) for m in METRICS}
        self.endpoints: dict[str, dict[str, _MetricModels]] = {}

    def _new(self, like: RecursiveLeastSquares | None) -> _MetricModels:
        model = RecursiveLeastSquares(
            DIM,
            forgetting=self.forgetting,
            prior=self.prior,
            weights=like.w if like is not None else None,
            floors=self.floors,
        )
        return _MetricModels(model, self.quantile)

    def _endpoint(self, key: str) -> dict[str, _MetricModels]:
        models = self.endpoints.get(key)
        if models is None:
            # The pooled fit is the new endpoint's prior.
            models = self.endpoints[key] = {m: self._new(self.pooled[m].model) for m in METRICS}
        return models

    def _predict(self, metric: str, key: str, x: Sequence[float]) -> tuple[float, float]:
        pooled = self.pooled[metric]
        own = self.endpoints.get(key)
        if own is None:
            return max(0.0, pooled.model.predict(x)), max(0.0, pooled.residual.value)
        mm = own[metric]
        alpha = min(1.0, mm.model.n / self.min_samples) if self.min_samples > 0 else 1.0
        value = alpha * mm.model.predict(x) + (1.0 - alpha) * pooled.model.predict(x)
        margin = alpha * mm.residual.value + (1.0 - alpha) * pooled.residual.value
        return max(0.0, value), max(0.0, margin)

    def predict_ttft(self, key: str, x: Sequence[float]) -> float:
        """`predict(key, x).ttft_s` alone: half the work, for scorers that rank by TTFT."""
        return self._predict("ttft", key, x)[0]

    def predict(self, key: str, x: Sequence[float]) -> LatencyPrediction:
        ttft, ttft_margin = self._predict("ttft", key, x)
        tpot, tpot_margin = self._predict("tpot", key, x)
        return LatencyPrediction(ttft, tpot, ttft_margin, tpot_margin)

    def observe(self, key: str, metric: str, x: Sequence[float], actual_s: float) -> None:
        if metric not in self.pooled or not math.isfinite(actual_s) or actual_s < 0:
            return
        pooled = self.pooled[metric]
        pooled.residual.update(pooled.model.update(x, actual_s))
        own = self._endpoint(key)[metric]
        own.residual.update(own.model.update(x, actual_s))

    def samples(self, key: str, metric: str = "ttft") -> int:
        own = self.endpoints.get(key)
        return own[metric].model.n if own is not None else 0

    def to_dict(self) -> dict[str, Any]:
        def dump(mm: _MetricModels) -> dict[str, Any]:
            r = mm.residual
            return {"model": mm.model.to_dict(), "residual": {"value": r.value, "mad": r.mad}}

        return {
            "features": list(FEATURES),
            "settings": {
                "forgetting": self.forgetting,
                "prior": self.prior,
                "min_samples": self.min_samples,
                "quantile": self.quantile,
            },
            "pooled": {m: dump(mm) for m, mm in self.pooled.items()},
            "endpoints": {
                key: {m: dump(mm) for m, mm in models.items()}
                for key, models in self.endpoints.items()
            },
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], **overrides: Any) -> LatencyModel:
        if list(data.get("features", ())) != list(FEATURES):
            raise ValueError(f"model features {data.get('features')} != {list(FEATURES)}")
        settings = {**dict(data.get("settings", {})), **overrides}
        out = cls(**settings)

        def load(raw: Mapping[str, Any]) -> _MetricModels:
            model = RecursiveLeastSquares.from_dict(
                raw["model"], forgetting=out.forgetting, prior=out.prior, floors=out.floors
            )
            mm = _MetricModels(model, out.quantile)
            mm.residual.value = float(raw["residual"]["value"])
            mm.residual.mad = float(raw["residual"]["mad"])
            return mm

        out.pooled = {m: load(data["pooled"][m]) for m in METRICS}
        out.endpoints = {
            str(key): {m: load(models[m]) for m in METRICS}
            for key, models in data.get("endpoints", {}).items()
        }
        return out
