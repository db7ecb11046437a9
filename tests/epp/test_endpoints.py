"""Datastore, static endpoints and the watched endpoints file (real files, real polling)."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest

from epp.endpoints import (
    Datastore,
    EndpointsFileSource,
    EndpointSpecError,
    dump_endpoints,
    parse_endpoints_document,
    parse_static,
    split_host_port,
)
from epp.metrics import EppMetrics
from epp.types import Role
from tests.polling import wait_until_async as wait_for


def test_static_list_and_ipv6() -> None:
    eps = parse_static("10.0.0.1:8000, 10.0.0.2:8001,[fd00::1]:9000")
    assert [e.key for e in eps] == ["10.0.0.1:8000", "10.0.0.2:8001", "[fd00::1]:9000"]
    assert eps[2].address == "fd00::1" and eps[0].engine_type == "vllm"
    for bad, why in [("10.0.0.1", "ip:port"), ("h:x", "non-numeric"), ("h:0", "1..65535")]:
        with pytest.raises(EndpointSpecError, match=why):
            split_host_port(bad)


def test_endpoints_document_forms() -> None:
    yaml_doc = """
endpoints:
- 10.0.0.1:8000
- address: 10.0.0.2
  port: 8000
  labels: {llm-d.ai/role: prefill, zone: a}
- endpoint: 10.0.0.3:8000
  role: decode
  engine_type: sglang
  pod_name: p3
"""
    eps = parse_endpoints_document(yaml_doc)
    assert [e.key for e in eps] == ["10.0.0.1:8000", "10.0.0.2:8000", "10.0.0.3:8000"]
    assert eps[1].role is Role.PREFILL and eps[1].labels["zone"] == "a"
    assert (eps[2].role, eps[2].engine_type, eps[2].pod_name) == (Role.DECODE, "sglang", "p3")
    again = parse_endpoints_document(dump_endpoints(eps))
    assert [(e.key, e.role, e.engine_type) for e in again] == [
        (e.key, e.role, e.engine_type) for e in eps
    ]


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("{", "not valid YAML"),
        ("42", "must be a list"),
        ("[3]", "entry 0"),
        ('[{"address": "a"}]', "port"),
        ('[{"address": "a", "port": 1, "labels": {"llm-d.ai/role": "chef"}}]', "prefill"),
        ('["a:1", "a:1"]', "duplicate"),
        ('[{"labels": {"x": 1}, "endpoint": "a:1"}]', "labels"),
    ],
)
def test_bad_documents_name_the_problem(text: str, why: str) -> None:
    with pytest.raises(EndpointSpecError, match=why):
        parse_endpoints_document(text)


def test_datastore_keeps_endpoint_objects_across_updates() -> None:
    store = Datastore()
    changes: list[int] = []
    store.on_change(lambda: changes.append(store.version))
    store.replace("static", parse_static("10.0.0.1:1,10.0.0.2:1"))
    first = store.get("10.0.0.1:1")
    assert first is not None
    first.metrics.waiting = 7
    store.replace(
        "static", parse_endpoints_document('[{"endpoint": "10.0.0.1:1", "role": "decode"}]')
    )
    kept = store.get("10.0.0.1:1")
    assert kept is first and kept.metrics.waiting == 7 and kept.role is Role.DECODE
    assert store.get("10.0.0.2:1") is None
    store.replace("file", parse_static("10.0.0.3:1"))
    assert [e.key for e in store.endpoints()] == ["10.0.0.1:1", "10.0.0.3:1"]
    assert changes == [1, 2, 3]


def write(path: Path, doc: object) -> None:
    # Bump the mtime explicitly: two writes within the filesystem's mtime granularity would
    # otherwise look unchanged when the size is equal too.
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))


async def test_watched_file_updates_and_keeps_last_good_set(tmp_path: Path) -> None:
    path = tmp_path / "endpoints.yaml"
    write(path, ["10.0.0.1:8000"])
    store, metrics = Datastore(), EppMetrics()
    source = EndpointsFileSource(path, store, metrics, interval_s=0.01)
    task = asyncio.create_task(source.run())
    try:
        await wait_for(lambda: [e.key for e in store.endpoints()] == ["10.0.0.1:8000"])
        write(path, ["10.0.0.1:8000", {"address": "10.0.0.2", "port": 8000}])
        await wait_for(lambda: len(store.endpoints()) == 2)
        write(path, "- : not: valid")
        errors = metrics.endpoint_source_errors.labels(source="file")
        await wait_for(lambda: errors._value.get() == 1)
        assert len(store.endpoints()) == 2 and source.last_error
        path.unlink()
        await wait_for(lambda: errors._value.get() == 2)
        assert len(store.endpoints()) == 2
        write(path, ["10.0.0.9:1"])
        await wait_for(lambda: [e.key for e in store.endpoints()] == ["10.0.0.9:1"])
        assert source.last_error is None and errors._value.get() == 2
    finally:
        task.cancel()
