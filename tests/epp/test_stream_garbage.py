"""A finished ext_proc stream leaves no reference cycles: its request, body and token ids are
freed by reference counting as soon as the stream ends, not by the garbage collector (which
would walk every one of them, 8k-entry id lists included, on each collection under load)."""

from __future__ import annotations

import asyncio
import gc
import json
from collections import Counter
from collections.abc import Iterator

import pytest

from benchmarks.extproc import request_messages
from benchmarks.h2client import ExtProcClient
from epp.extproc import PickerContext, RequestStream
from epp.framework import build_scheduler, load_config
from epp.h2edge.server import H2ExtProcServer
from epp.metrics import EppMetrics
from epp.plugins import default_registry
from epp.requests import RequestParser
from epp.types import Endpoint

ENDPOINTS = [Endpoint(f"10.0.0.{i}", 8000) for i in range(1, 9)]


def body(i: int) -> bytes:
    messages = [
        {"role": "system", "content": "You route requests. " * 50},
        {"role": "user", "content": f"question {i}"},
    ]
    return json.dumps({"model": "m", "messages": messages, "stream": True}).encode()


@pytest.fixture
def saved_garbage() -> Iterator[list[object]]:
    """gc.garbage while DEBUG_SAVEALL keeps whatever a collection finds unreachable."""
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        yield gc.garbage
    finally:
        gc.set_debug(0)
        gc.garbage.clear()


def context() -> PickerContext:
    # The default profile (queue, kv-cache utilization, approximate prefix, max-score).
    scheduler = build_scheduler(load_config(None, default_registry()))
    return PickerContext(scheduler, lambda: ENDPOINTS, RequestParser(), EppMetrics())


def kinds(garbage: list[object]) -> Counter[str]:
    return Counter(type(o).__name__ for o in garbage)


async def test_the_state_machine_leaves_no_cycles(saved_garbage: list[object]) -> None:
    ctx = context()
    for i in range(3):
        stream = RequestStream(ctx)
        responses = []
        for message in request_messages(body(i)):
            responses += await stream.handle(message)
        assert responses and responses[0].HasField("request_headers")
        stream.close()
        del stream, responses
    assert gc.collect() == 0, kinds(saved_garbage)


async def test_streams_through_the_h2_edge_leave_no_cycles(saved_garbage: list[object]) -> None:
    server = H2ExtProcServer(context(), health=lambda service: None)
    port = await server.bind("127.0.0.1", 0)
    await server.start_serving()
    client = await asyncio.to_thread(ExtProcClient, "127.0.0.1", port)
    try:

        def run(first: int) -> None:
            for i in range(first, first + 3):
                client.stream([m.SerializeToString() for m in request_messages(body(i))])

        await asyncio.to_thread(run, 0)  # the connection's own start-up
        gc.collect()
        saved_garbage.clear()
        await asyncio.to_thread(run, 10)
        assert gc.collect() == 0, kinds(saved_garbage)
    finally:
        client.close()
        await server.stop()
