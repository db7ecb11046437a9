from __future__ import annotations

import threading

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvindex.speculative import SpeculativeConfig, SpeculativeIndex


class FakeClock:
    """A settable monotonic clock (the clock is injected; no real time passes in tests)."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make(ttl: float = 2.0, max_entries: int = 1000) -> tuple[SpeculativeIndex, FakeClock]:
    clock = FakeClock()
    return SpeculativeIndex(SpeculativeConfig(ttl_s=ttl, max_entries=max_entries), clock), clock


def test_record_then_extend_until_expiry() -> None:
    spec, clock = make()
    assert spec.record("e:1", [1, 2, 3]) == 3
    assert spec.extend("e:1", [1, 2, 3, 4]) == 3
    assert spec.extend("e:1", [1, 2, 3, 4], start=1) == 2
    assert spec.extend("e:1", [9, 2, 3]) == 0  # consecutive from the start position only
    assert spec.extend("e:2", [1, 2, 3]) == 0
    clock.now += 1.999
    assert spec.extend("e:1", [1, 2, 3]) == 3
    clock.now += 0.001
    assert spec.extend("e:1", [1, 2, 3]) == 0
    assert len(spec) == 0
    assert spec.stats().expired == 3


def test_rerecord_refreshes_ttl() -> None:
    spec, clock = make()
    spec.record("e:1", [1, 2])
    clock.now += 1.5
    spec.record("e:1", [1])
    clock.now += 1.0  # 2.5 s after the first record, 1.0 s after the second
    assert spec.extend("e:1", [1, 2]) == 1
    assert len(spec) == 1


def test_bound_drops_oldest() -> None:
    spec, clock = make(max_entries=3)
    spec.record("e:1", [1, 2])
    clock.now += 0.1
    spec.record("e:2", [5, 6])
    assert len(spec) == 3
    assert spec.stats().dropped == 1
    assert spec.extend("e:1", [1, 2]) == 0  # key 1 of e:1 was the oldest
    assert spec.extend("e:1", [2]) == 1
    assert spec.extend("e:2", [5, 6]) == 2


def test_forget_and_purge_engine() -> None:
    spec, _ = make()
    spec.record("e:1", [1, 2, 3])
    spec.record("e:2", [1])
    spec.forget("e:1", [1])
    assert spec.extend("e:1", [1, 2, 3]) == 0
    assert spec.extend("e:1", [2, 3]) == 2
    spec.purge_engine("e:1")
    assert spec.engines() == ["e:2"]
    assert len(spec) == 1


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="ttl"):
        SpeculativeConfig(ttl_s=0)
    with pytest.raises(ValueError, match="weight"):
        SpeculativeConfig(weight=1.5)


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["a", "b", "c"]),
            st.lists(st.integers(0, 20), max_size=6),
            st.floats(0, 1.5),
        ),
        max_size=40,
    ),
    st.integers(1, 15),
)
def test_matches_a_naive_model(ops: list[tuple[str, list[int], float]], bound: int) -> None:
    """Against a naive dict model: live entries are the newest `bound` non-expired records."""
    spec, clock = make(ttl=2.0, max_entries=bound)
    model: dict[tuple[str, int], float] = {}
    order: list[tuple[str, int]] = []
    for engine, keys, advance in ops:
        clock.now += advance
        spec.record(engine, keys)
        for key in keys:
            model[(engine, key)] = clock.now + 2.0
            if (engine, key) in order:
                order.remove((engine, key))
            order.append((engine, key))
        order = [item for item in order if model[item] > clock.now]
        order = order[-bound:]
        assert len(spec) == len(order)
        for engine_name in ("a", "b", "c"):
            for key in range(21):
                held = (engine_name, key) in order
                assert spec.extend(engine_name, [key]) == int(held)


def test_concurrent_record_and_extend_keep_counts_consistent() -> None:
    """The edges call scoring from worker threads: records, lookups and forgets interleave."""
    spec = SpeculativeIndex(SpeculativeConfig(ttl_s=60.0, max_entries=500))
    errors: list[BaseException] = []

    def work(worker: int) -> None:
        try:
            for round_ in range(300):
                keys = [worker * 10_000 + round_ * 7 + i for i in range(8)]
                spec.record(f"e:{worker}", keys)
                spec.extend(f"e:{worker}", keys)
                spec.engines()
                if round_ % 5 == 0:
                    spec.forget(f"e:{worker}", keys[:2])
        except BaseException as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert errors == []
    assert len(spec) <= 500
    live = sum(spec.extend(engine, [k]) for engine in spec.engines() for k in _all_keys())
    assert live == len(spec)


def _all_keys() -> set[int]:
    return {w * 10_000 + r * 7 + i for w in range(4) for r in range(300) for i in range(8)}
