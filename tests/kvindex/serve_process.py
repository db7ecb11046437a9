"""`kvindex serve` as a real subprocess for the end-to-end tests (real HTTP, gRPC, ZMQ, Redis):
start with flags on free ports, wait until healthy, JSON helpers, SIGTERM stop with exit 0.
A uniquely named module so `import serve_process` is unambiguous."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tests.metrics import sample
from tests.polling import wait_until
from tests.ports import free_port

KVINDEX = [sys.executable, "-m", "kvindex.cli"]


def wait_for(predicate: Callable[[], bool], timeout: float = 20.0, what: str = "condition") -> None:
    """`tests.polling.wait_until` with the longer default a server process start needs."""
    wait_until(predicate, timeout, what, interval=0.02)


def http(method: str, url: str, body: Any = None, raw: bytes | None = None) -> tuple[int, Any]:
    """(status, parsed JSON or text); status 0 when nothing answers."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    request = urllib.request.Request(
        url, data=data, method=method, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            status, text = response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        status, text = exc.code, exc.read().decode()
    except OSError:
        return 0, None
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


class ServeProcess:
    """One `kvindex serve` subprocess on free HTTP and gRPC ports; logs go to a file."""

    def __init__(self, args: Sequence[str], grpc: bool = True) -> None:
        self.http_port = free_port()
        self.grpc_port = free_port() if grpc else None
        self.base = f"http://127.0.0.1:{self.http_port}"
        self.log = Path(tempfile.mkstemp(prefix="kvindex-serve-", suffix=".log")[1])
        cmd = [
            *KVINDEX,
            "serve",
            "--http-host",
            "127.0.0.1",
            "--http-port",
            str(self.http_port),
            "--log-format",
            "json",
            *args,
        ]
        if self.grpc_port is not None:
            cmd += ["--grpc-port", str(self.grpc_port)]
        self._log_file = self.log.open("w")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=self._log_file)

    def wait_ready(self, timeout: float = 60.0) -> None:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"kvindex serve exited {self.proc.returncode}: {self.logs()}")
            return self.get("/readyz")[0] == 200

        wait_for(ready, timeout, "kvindex serve ready")

    def get(self, path: str) -> tuple[int, Any]:
        return http("GET", self.base + path)

    def post(self, path: str, body: Any) -> tuple[int, Any]:
        return http("POST", self.base + path, body)

    def score(self, body: dict[str, Any]) -> dict[str, int]:
        """engine -> matched blocks of a /v1/score that must succeed."""
        status, data = self.post("/v1/score", body)
        assert status == 200, (status, data)
        return {s["engine"]: s["matched_blocks"] for s in data["scores"]}

    def metrics(self) -> str:
        status, text = self.get("/metrics")
        assert status == 200
        return str(text)

    def metric(self, name: str, /, **labels: str) -> float:
        """One sample of /metrics with exactly ``labels`` (0 when absent)."""
        return sample(self.metrics(), name, **labels)

    def logs(self) -> str:
        return self.log.read_text()

    def stop(self) -> int:
        """SIGTERM; the exit code (killed after 15 s)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self._log_file.close()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=5)
        self._log_file.close()
