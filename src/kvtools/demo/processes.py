"""The demo's processes: simulated engines (`kvindex-sim`) and the picker (`epp serve`),
each in its own process group with a log file, started with readiness checks and stopped as
a whole. (Envoy: kvtools.demo.envoy.) The demo launches the picker as a program; kvindex
never imports epp."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "Engine",
    "ManagedProcess",
    "PortInUse",
    "PortReservation",
    "start_picker",
    "start_sim",
    "stop_process_group",
]


class PortInUse(RuntimeError):
    pass


class PortReservation:
    """Loopback ports held for child processes until they have bound them.

    A port found free by binding port 0 is free again the moment that socket closes, and
    before a child process binds it the kernel may hand it to someone else, most often as the
    ephemeral source port of an outgoing connection: an engine's PUB socket redialling the
    picker's events port, Envoy dialling the picker. Each reserved port stays bound with
    SO_REUSEADDR and never listens; the kernel then gives it to no ephemeral bind or
    connect, while a server that also sets SO_REUSEADDR (asyncio, aiohttp, gRPC, ZMQ, Envoy
    and redis-server all do) still binds and listens on it. Close the reservation once the
    children are serving or gone."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self._host = host
        self._held: list[socket.socket] = []

    def port(self) -> int:
        sock = socket.socket()
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self._host, 0))
        except OSError:
            sock.close()
            raise
        self._held.append(sock)
        return int(sock.getsockname()[1])

    def close(self) -> None:
        for sock in self._held:
            sock.close()
        self._held.clear()

    def __enter__(self) -> PortReservation:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def check_port_free(port: int, flag: str, host: str = "127.0.0.1") -> None:
    """Raise PortInUse naming the port and the flag that changes it."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise PortInUse(
                f"port {port} on {host} is already in use ({exc.strerror}); "
                f"choose another with {flag} PORT (0 picks a free one)"
            ) from exc


def stop_process_group(process: subprocess.Popen[bytes], timeout_s: float = 10.0) -> None:
    """SIGTERM the process group of `process` (started with `start_new_session=True`), SIGKILL
    it if it has not exited within `timeout_s`; a group that is already gone is fine."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=timeout_s)
    except ProcessLookupError:
        pass


def _script(name: str) -> str:
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"`{name}` not found: install the project (make demo does)")
    return found


class ManagedProcess:
    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        workdir: Path,
        env: Mapping[str, str] | None = None,
    ) -> None:
        """`env`: the child's whole environment (default: this process's, unbuffered)."""
        self.name = name
        self.log_path = workdir / f"{name}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 (closed in stop)
        env = dict(env) if env is not None else {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen(
            list(argv),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env=env,
        )

    def log(self, tail: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-tail:]
        except OSError:
            return ""

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            raise RuntimeError(
                f"{self.name} exited with code {self.process.returncode}:\n{self.log()}"
            )

    def stop(self) -> None:
        stop_process_group(self.process)
        self._log.close()


@dataclass(frozen=True, slots=True)
class Engine:
    name: str  # engine-<i>, the simulator's x-kvsim-engine value
    url: str
    endpoint: str  # ip:port, the picker's endpoint key


_ENGINE_LINE = re.compile(r"^(engine-\d+) rank 0: http (http://([\d.]+):(\d+)) ")


def start_sim(
    workdir: Path,
    *,
    engines: int,
    model_dir: Path,
    model: str,
    events_endpoint: str,
    num_gpu_blocks: int,
    max_num_seqs: int,
    time_scale: float,
    prefill_ms_per_token: float,
    decode_ms_per_token: float,
    timeout_s: float = 30.0,
) -> tuple[ManagedProcess, list[Engine]]:
    argv = [
        _script("kvindex-sim"),
        f"--engines={engines}",
        "--base-port=0",
        f"--model={model}",
        f"--tokenizer={model_dir}",
        f"--kv-events-endpoint={events_endpoint}",
        f"--num-gpu-blocks={num_gpu_blocks}",
        f"--max-num-seqs={max_num_seqs}",
        f"--time-scale={time_scale}",
        f"--prefill-ms-per-token={prefill_ms_per_token}",
        f"--decode-ms-per-token={decode_ms_per_token}",
    ]
    process = ManagedProcess("engines", argv, workdir)
    deadline = time.monotonic() + timeout_s
    while True:
        found = [_ENGINE_LINE.match(line) for line in process.log(100_000).splitlines()]
        matches = [m for m in found if m]
        if len(matches) >= engines:
            return process, [
                Engine(m.group(1), m.group(2), f"{m.group(3)}:{m.group(4)}") for m in matches
            ]
        process.check_alive()
        if time.monotonic() > deadline:
            process.stop()
            raise RuntimeError(f"simulated engines not up in {timeout_s:.0f}s:\n{process.log()}")
        time.sleep(0.05)


def start_picker(
    workdir: Path,
    *,
    config: str,
    endpoints: Sequence[str],
    grpc_port: int,
    health_port: int,
    metrics_port: int,
    secure_serving: bool = True,
    timeout_s: float = 60.0,
    extra_args: Sequence[str] = (),
) -> ManagedProcess:
    """secure_serving=False: plaintext ext_proc, for the direct gateway (grpc's Python client
    cannot skip verifying the picker's self-signed certificate). `extra_args`: more `epp
    serve` flags (e.g. `--objects-file`)."""
    config_path = workdir / "picker.yaml"
    config_path.write_text(config)
    argv = [
        _script("epp"),
        "serve",
        f"--config={config_path}",
        "--host=127.0.0.1",
        f"--grpc-port={grpc_port}",
        f"--health-port={health_port}",
        f"--metrics-port={metrics_port}",
        f"--endpoints={','.join(endpoints)}",
        "--log-level=warning",
    ]
    if not secure_serving:
        argv.append("--no-secure-serving")
    argv += extra_args
    process = ManagedProcess("picker", argv, workdir)
    _wait_serving(process, health_port, timeout_s)
    return process


def _wait_serving(process: ManagedProcess, health_port: int, timeout_s: float) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(f"127.0.0.1:{health_port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            process.check_alive()
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service="readiness"), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                process.stop()
                raise RuntimeError(f"picker not ready in {timeout_s:.0f}s:\n{process.log()}")
            time.sleep(0.1)
