"""Background threads carry their name into the OS (`/proc/<pid>/task/<tid>/comm`), where
`top -H` and the routing benchmark's CPU split by thread read it."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import pytest

from kvindex.index import IndexConfig, make_index
from kvindex.ingest_service import IngestService, IngestServiceConfig
from kvindex.threads import OS_NAME_MAX, named_thread, set_os_thread_name
from tests.polling import wait_until

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux /proc")


def _os_name(native_id: int) -> str:
    return Path(f"/proc/self/task/{native_id}/comm").read_text().strip()


def _run_and_read(name: str) -> tuple[str, str]:
    seen: dict[str, str] = {}
    done = threading.Event()

    def body() -> None:
        seen["os"] = _os_name(threading.get_native_id())
        seen["py"] = threading.current_thread().name
        done.set()

    thread = named_thread(body, name)
    thread.start()
    assert done.wait(10.0)
    thread.join(10.0)
    return seen["os"], seen["py"]


def test_a_named_thread_is_named_in_the_os_too() -> None:
    assert _run_and_read("kvindex-ingest") == ("kvindex-ingest", "kvindex-ingest")


def test_a_long_name_is_cut_to_what_the_os_keeps() -> None:
    os_name, py_name = _run_and_read("kvindex-redis-writer")
    assert os_name == "kvindex-redis-writer"[:OS_NAME_MAX] and py_name == "kvindex-redis-writer"


def test_naming_never_raises() -> None:
    # Only the calling thread changes; an empty or odd name is the OS's business.
    before = _os_name(threading.get_native_id())
    try:
        assert set_os_thread_name("x" * 64) is True
        assert _os_name(threading.get_native_id()) == "x" * OS_NAME_MAX
    finally:
        set_os_thread_name(before)


def test_the_ingest_thread_is_named() -> None:
    service = IngestService(
        IngestServiceConfig(accept_any_engine=True, health_check_interval_s=0.0),
        make_index(IndexConfig()),
    )
    service.start()

    def names() -> set[str]:
        out = set()
        for comm in Path("/proc/self/task").glob("*/comm"):
            try:
                out.add(comm.read_text().strip())
            except OSError:  # a thread that ended meanwhile
                continue
        return out

    try:
        wait_until(lambda: "kvindex-ingest" in names(), timeout=10.0)
    finally:
        service.stop()
