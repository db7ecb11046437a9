"""`kvindex serve` as a real subprocess: real ZMQ ingest, real HTTP, signals, exit codes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from ingest_helpers import wait_for
from vllm_publisher import VllmPublisher

from tests.events import stored
from tests.ports import free_port

KVINDEX = [sys.executable, "-m", "kvindex.cli"]


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except OSError:
        return 0, ""


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[tuple[int, int, subprocess.Popen[str]]]:
    zmq_port, http_port = free_port(), free_port()
    proc = subprocess.Popen(
        [
            *KVINDEX,
            "serve",
            "--zmq-bind",
            f"tcp://127.0.0.1:{zmq_port}",
            "--accept-any-engine",
            "--http-host",
            "127.0.0.1",
            "--http-port",
            str(http_port),
            "--log-format",
            "json",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    yield zmq_port, http_port, proc
    if proc.poll() is None:
        proc.kill()
    proc.communicate(timeout=10)


def test_serve_ingests_and_serves_http(serve: tuple[int, int, subprocess.Popen[str]]) -> None:
    zmq_port, http_port, proc = serve
    base = f"http://127.0.0.1:{http_port}"
    wait_for(lambda: get(base + "/healthz")[0] == 200, timeout=30, what="serve up")
    wait_for(lambda: get(base + "/readyz")[0] == 200, what="ready")
    pub = VllmPublisher(f"tcp://127.0.0.1:{zmq_port}")
    try:

        def stored_seen() -> bool:
            pub.publish(stored([1, 2], None, list(range(32))))
            return "kvindex_ingest_stored_blocks_total 0.0" not in get(base + "/metrics")[1]

        wait_for(stored_seen, what="blocks stored via the subprocess")
        _, text = get(base + "/metrics")
        assert "kvindex_index_engines 1.0" in text
        assert 'kvindex_ingest_events_total{type="BlockStored"}' in text
    finally:
        pub.close()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 0
    assert proc.stderr is not None
    logs = [json.loads(line) for line in proc.stderr.read().splitlines() if line.strip()]
    assert any("event=service_started" in entry["msg"] for entry in logs)
    assert any("event=engine_seen engine=127.0.0.1:8000" in entry["msg"] for entry in logs)


def _serve_while_port_taken(
    args: Callable[[int], list[str]],
) -> tuple[int, subprocess.CompletedProcess[str]]:
    """`kvindex serve` with `args(port)` while a listening socket holds `port`."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = subprocess.run(
            [*KVINDEX, "serve", *args(port)], capture_output=True, text=True, timeout=30
        )
    return port, result


def test_serve_http_port_in_use() -> None:
    port, result = _serve_while_port_taken(
        lambda port: [
            "--http-host",
            "127.0.0.1",
            "--http-port",
            str(port),
            "--zmq-bind",
            f"tcp://127.0.0.1:{free_port()}",
            "--accept-any-engine",
        ]
    )
    assert result.returncode == 2
    assert f"HTTP port {port} is in use" in result.stderr
    assert "--http-port" in result.stderr


def test_serve_zmq_port_in_use() -> None:
    port, result = _serve_while_port_taken(
        lambda port: [
            "--http-port",
            str(free_port()),
            "--http-host",
            "127.0.0.1",
            "--zmq-bind",
            f"tcp://127.0.0.1:{port}",
            "--accept-any-engine",
        ]
    )
    assert result.returncode == 2
    assert f"tcp://127.0.0.1:{port} is in use" in result.stderr
    assert "--zmq-bind" in result.stderr


def test_serve_refuses_a_bind_socket_without_discovery() -> None:
    # Strict by default: with no discovery every event on the bind socket would be dropped;
    # the service says so at start-up instead of running blind.
    result = subprocess.run(
        [*KVINDEX, "serve", "--zmq-bind", f"tcp://127.0.0.1:{free_port()}"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "--accept-any-engine" in result.stderr
    assert "--engines-file" in result.stderr


def test_serve_bad_config_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("http_port: 8080\nzmq_bind: 5\n")
    result = subprocess.run(
        [*KVINDEX, "serve", "--config", str(path)], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2
    assert f"{path}:2: zmq_bind" in result.stderr


def test_serve_bad_engines_file(tmp_path: Path) -> None:
    path = tmp_path / "engines.yaml"
    path.write_text("- endpoint: nope\n")
    result = subprocess.run(
        [*KVINDEX, "serve", "--engines-file", str(path), "--http-port", str(free_port())],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ},
    )
    assert result.returncode == 2
    assert "engines[0]" in result.stderr and "ip:port" in result.stderr
