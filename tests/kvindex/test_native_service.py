"""The `native` service backend (`kvindex serve --backend native`): events published over a
real ZMQ socket land in a NativeIndex behind the service's LockedIndex."""

from __future__ import annotations

import pytest
from ingest_helpers import keys_for, probe, wait_for
from vllm_publisher import VllmPublisher

from kvindex.config import ServiceConfig
from kvindex.index import PrefixMatch, make_index
from kvindex.index.native import NATIVE_AVAILABLE, NativeIndex
from kvindex.service.app import IndexService, index_config
from tests.events import removed, stored

pytestmark = pytest.mark.skipif(not NATIVE_AVAILABLE, reason="kvindex._native not built")


def test_backend_factory_applies_capacity_flags() -> None:
    index = make_index(index_config(ServiceConfig(backend="native", index_max_keys=1234))).inner
    assert isinstance(index, NativeIndex) and index.max_keys == 1234
    budget = ServiceConfig(backend="native", index_memory_budget="60KB")
    budgeted = make_index(index_config(budget)).inner
    assert isinstance(budgeted, NativeIndex) and budgeted.max_keys == 1000


async def test_events_over_zmq_reach_the_native_index() -> None:
    config = ServiceConfig(
        backend="native",
        default_model="m",
        zmq_bind=["tcp://127.0.0.1:*"],
        accept_any_engine=True,
        http_host="127.0.0.1",
        http_port=0,
    )
    service = IndexService(config)
    assert isinstance(service.index.inner, NativeIndex)
    await service.start()
    pub = VllmPublisher(service.zmq_bound[0])
    engine = "127.0.0.1:8000"
    try:
        probe(pub, service.index, engine)
        tokens = list(range(64))
        pub.publish(stored([11, 12, 13, 14], None, tokens))
        wait_for(lambda: service.index.resolve(engine, 14) is not None, what="stored blocks")
        keys = keys_for(tokens)
        assert service.index.lookup(keys) == {engine: PrefixMatch(4, [4, 0, 0])}
        pub.publish(removed([13]))
        wait_for(lambda: service.index.resolve(engine, 13) is None, what="removal")
        assert service.index.lookup(keys) == {engine: PrefixMatch(2, [2, 0, 0])}
    finally:
        pub.close()
        await service.stop()
