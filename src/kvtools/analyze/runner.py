"""Run policies over a trace, for one settings point or a sweep; optionally in parallel
processes (each policy is independent and deterministic, so results do not depend on the
number of jobs)."""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from kvtools.analyze.config import ConfigError, weight_name
from kvtools.analyze.metrics import PolicyResult
from kvtools.analyze.model import Trace
from kvtools.analyze.simulation import SimSettings, simulate

__all__ = ["SweepError", "SweepPoint", "SweepSpec", "parse_sweep", "run_point", "run_sweep"]


class SweepError(ValueError):
    """A --sweep value the analysis cannot use."""


@dataclass(frozen=True, slots=True)
class SweepSpec:
    parameter: str  # "engines" | "capacity" | "weights"
    weight: str | None  # weights: which scorer weight
    values: tuple[float, ...]

    def label(self, value: float) -> str:
        shown = f"{value:g}"
        if self.parameter == "weights":
            return f"{self.weight}={shown}"
        return f"{self.parameter}={shown}"

    def apply(self, settings: SimSettings, value: float) -> SimSettings:
        if self.parameter == "engines":
            return replace(settings, engines=int(value))
        if self.parameter == "capacity":
            return replace(settings, capacity_blocks=int(value))
        assert self.weight is not None
        return replace(settings, picker=settings.picker.with_weight(self.weight, value))


def parse_sweep(text: str) -> SweepSpec:
    """``engines=4,8,16`` | ``capacity=500,1000`` (blocks per engine) |
    ``weights=prefix:1,3,5`` (any scorer weight name)."""
    name, sep, raw = text.partition("=")
    name = name.strip()
    if not sep or name not in ("engines", "capacity", "weights"):
        raise SweepError(
            f"--sweep {text!r}: expected engines=4,8,16, capacity=N,... or weights=prefix:1,3,5"
        )
    weight = None
    if name == "weights":
        weight_raw, colon, raw = raw.partition(":")
        if not colon:
            raise SweepError(f"--sweep {text!r}: weights sweeps name a scorer, e.g. prefix:1,3,5")
        try:
            weight = weight_name(weight_raw.strip())
        except ConfigError as e:
            raise SweepError(f"--sweep {text!r}: {e}") from e
    try:
        values = tuple(float(v) for v in raw.split(",") if v.strip())
    except ValueError as e:
        raise SweepError(f"--sweep {text!r}: values must be numbers") from e
    if not values:
        raise SweepError(f"--sweep {text!r}: no values")
    if name != "weights" and any(v < 1 or v != int(v) for v in values):
        raise SweepError(f"--sweep {text!r}: {name} values must be positive integers")
    if name == "weights" and any(v < 0 for v in values):
        raise SweepError(f"--sweep {text!r}: weights must be >= 0")
    return SweepSpec(name, weight, values)


@dataclass(slots=True)
class SweepPoint:
    label: str
    settings: SimSettings
    results: list[PolicyResult]


def _run_one(args: tuple[Trace, str, SimSettings]) -> PolicyResult:
    trace, policy, settings = args
    return simulate(trace, policy, settings)


Advance = Callable[[int], None]
"""Progress callback: called with a number of requests simulated since the last call."""


def _run_all(
    trace: Trace,
    tasks: Sequence[tuple[str, SimSettings]],
    jobs: int,
    advance: Advance | None,
) -> list[PolicyResult]:
    """Progress is in requests: per request in one process, per finished run otherwise."""
    n_requests = len(trace.requests)
    if jobs <= 1 or len(tasks) <= 1:
        out = []
        for policy, settings in tasks:
            done = 0

            def step(n: int) -> None:
                nonlocal done
                if advance is not None:
                    advance(n - done)
                done = n

            out.append(simulate(trace, policy, settings, step))
        return out
    # fork shares the already-read trace with the workers for free where available.
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    results: list[PolicyResult | None] = [None] * len(tasks)
    with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
        futures = {
            pool.submit(_run_one, (trace, policy, settings)): i
            for i, (policy, settings) in enumerate(tasks)
        }
        for future in cf.as_completed(futures):
            results[futures[future]] = future.result()
            if advance is not None:
                advance(n_requests)
    return [r for r in results if r is not None]


def run_point(
    trace: Trace,
    policies: Sequence[str],
    settings: SimSettings,
    jobs: int = 1,
    advance: Advance | None = None,
) -> list[PolicyResult]:
    return _run_all(trace, [(p, settings) for p in policies], jobs, advance)


def run_sweep(
    trace: Trace,
    policies: Sequence[str],
    base: SimSettings,
    sweep: SweepSpec | None,
    jobs: int = 1,
    advance: Advance | None = None,
) -> list[SweepPoint]:
    """One point per sweep value (or the base settings alone); all (point, policy) runs
    share one process pool."""
    if sweep is None:
        points = [("base", base)]
    else:
        points = [(sweep.label(v), sweep.apply(base, v)) for v in sweep.values]
    tasks = [(p, s) for _, s in points for p in policies]
    flat = _run_all(trace, tasks, jobs, advance)
    n = len(policies)
    return [
        SweepPoint(label, settings, flat[k * n : (k + 1) * n])
        for k, (label, settings) in enumerate(points)
    ]
