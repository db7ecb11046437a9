"""kvtools.demo.report.quantile: the one percentile the demo and the benchmarks report."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from kvtools.demo.report import quantile

finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False)


def test_known_values() -> None:
    assert quantile([], 0.5) is None
    assert quantile([3.0], 0.9) == 3.0
    assert quantile([1.0, 2.0, 3.0, 4.0], 0.5) == 2.5
    # p90 of 1..10 is 9.1 (between the 9th and 10th values), not the maximum
    assert quantile([float(v) for v in range(10, 0, -1)], 0.9) == 9.1


@given(st.lists(finite, min_size=1, max_size=50), st.floats(min_value=0.0, max_value=1.0))
def test_bounded_monotone_and_exact_at_the_ends(values: list[float], q: float) -> None:
    tol = 1e-9 * (1.0 + max(abs(v) for v in values))  # interpolation's rounding
    value = quantile(values, q)
    higher = quantile(values, min(1.0, q + 0.1))
    assert value is not None and higher is not None
    assert min(values) - tol <= value <= max(values) + tol
    assert value <= higher + tol
    assert quantile(values, 0.0) == min(values) and quantile(values, 1.0) == max(values)
