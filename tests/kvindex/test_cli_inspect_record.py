"""`kvindex record` and `kvindex inspect` as real subprocesses against a real publisher, and the
capture file format."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st
from vllm_publisher import VllmPublisher

from kvindex.capture import MAGIC, CaptureError, CaptureWriter, read_capture, read_capture_header
from tests.events import encode_batch, removed, stored
from tests.ports import free_port

KVINDEX = [sys.executable, "-m", "kvindex.cli"]


def publish_until_exit(
    pub: VllmPublisher, proc: subprocess.Popen[str], timeout: float = 20
) -> None:
    """Keep publishing (slow joiner) until the subprocess has taken its --count and exited."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None:
        assert time.monotonic() < deadline, "subprocess never finished"
        pub.publish(stored([pub.seq + 1], None, list(range(16))), removed([7]))
        time.sleep(0.01)


def test_record_then_inspect_round_trip(tmp_path: Path) -> None:
    out = tmp_path / "cap.kvcap"
    pub = VllmPublisher(f"tcp://*:{free_port()}", topic="kv@10.0.0.1:8000@m")
    endpoint = pub.endpoint.replace("0.0.0.0", "127.0.0.1")
    try:
        proc = subprocess.Popen(
            [*KVINDEX, "record", endpoint, "-o", str(out), "--count", "5"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        publish_until_exit(pub, proc)
        _, err = proc.communicate(timeout=10)
        assert proc.returncode == 0, err
        assert "5 frames written" in err
    finally:
        pub.close()
    frames = list(read_capture(out))
    assert len(frames) == 5
    assert all(f.topic == b"kv@10.0.0.1:8000@m" for f in frames)
    assert [f.seq for f in frames] == list(range(frames[0].seq, frames[0].seq + 5))
    assert read_capture_header(out).source == endpoint
    result = subprocess.run(
        [*KVINDEX, "inspect", str(out), "--json"], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["seq"] for line in lines] == [f.seq for f in frames]
    assert lines[0]["events"][0]["type"] == "BlockStored"
    assert lines[0]["events"][1] == {
        "type": "BlockRemoved",
        "block_hashes": [7],
        "medium": "GPU",
        "group_idx": 0,
    }
    assert all(line["gap"] is None for line in lines)


def test_inspect_live_bind_by_star(tmp_path: Path) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [*KVINDEX, "inspect", f"tcp://*:{port}", "--count", "3"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    pub = VllmPublisher(f"tcp://127.0.0.1:{port}")  # no '*': connects, as vLLM would
    try:
        publish_until_exit(pub, proc)
    finally:
        pub.close()
    out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    assert out.count("topic=kv@127.0.0.1:8000@m") == 3
    assert "BlockStored block_hashes=" in out


def test_inspect_shows_gaps_restarts_and_garbage(tmp_path: Path) -> None:
    path = tmp_path / "gaps.kvcap"
    topic = b"kv@10.0.0.1:8000@m"
    with CaptureWriter(path) as writer:
        for seq in (0, 1, 4, 0):
            writer.write(topic, seq, encode_batch([stored([seq], None, list(range(16)))]), 1.0)
        writer.write(topic, 1, b"\xc1junk", 2.0)
    result = subprocess.run([*KVINDEX, "inspect", str(path)], capture_output=True, text=True)
    assert result.returncode == 0
    assert "! gap: expected seq 2, got 4 (2 batches missing)" in result.stdout
    assert "! restart: seq back to 0 (was 4)" in result.stdout
    assert "! undecodable payload" in result.stdout


def test_inspect_missing_file_and_bad_capture(tmp_path: Path) -> None:
    result = subprocess.run(
        [*KVINDEX, "inspect", str(tmp_path / "nope")], capture_output=True, text=True
    )
    assert result.returncode == 2 and "no such capture file" in result.stderr
    bad = tmp_path / "bad"
    bad.write_bytes(b"not a capture")
    result = subprocess.run([*KVINDEX, "inspect", str(bad)], capture_output=True, text=True)
    assert result.returncode == 2 and "bad magic" in result.stderr


@given(
    st.lists(
        st.tuples(
            st.floats(0, 2e9),
            st.binary(max_size=40),
            st.integers(0, 2**64 - 1),
            st.binary(max_size=200),
        ),
        max_size=20,
    ),
    st.integers(0, 12),
)
def test_capture_round_trip_and_truncated_tail(
    tmp_path_factory: pytest.TempPathFactory,
    records: list[tuple[float, bytes, int, bytes]],
    cut: int,
) -> None:
    path = tmp_path_factory.mktemp("cap") / "c.kvcap"
    with CaptureWriter(path, source="tcp://x:1") as writer:
        for received_at, topic, seq, payload in records:
            writer.write(topic, seq, payload, received_at)
    got = [(f.received_at, f.topic, f.seq, f.payload) for f in read_capture(path)]
    assert got == records
    data = path.read_bytes()
    if records and cut:
        path.write_bytes(data[: len(data) - cut])  # killed mid-write: last record dropped
        assert [(f.received_at, f.topic, f.seq, f.payload) for f in read_capture(path)] == records[
            :-1
        ]


def test_capture_rejects_damage(tmp_path: Path) -> None:
    path = tmp_path / "c"
    path.write_bytes(MAGIC + (5).to_bytes(4, "big") + b"\xc1\xc1\xc1\xc1\xc1")
    with pytest.raises(CaptureError, match="bad header"):
        list(read_capture(path))
    header = msgspec.msgpack.encode({"format": "kvindex-capture", "version": 1})
    path.write_bytes(
        MAGIC + len(header).to_bytes(4, "big") + header + (3).to_bytes(4, "big") + b"\x93\x01\x02"
    )
    with pytest.raises(CaptureError, match="bad record"):
        list(read_capture(path))
