"""`kvindex-sim` as a real process: N engines on run-time ports, then a clean SIGTERM stop."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request

import pytest
from simzmq import replay_request

from kvindex.vllm_hash import block_hashes, wire_value
from kvtools.sim.cli import build_parser, main, server_configs


def test_server_configs_offsets_binding_endpoints_per_engine() -> None:
    args = build_parser().parse_args(
        [
            "--engines",
            "3",
            "--data-parallel-size",
            "2",
            "--kv-events-endpoint",
            "tcp://*:5557",
            "--kv-replay-endpoint",
            "tcp://*:6557",
            "--base-port",
            "8000",
            "--lora",
            "a=/p",
        ]
    )
    configs = server_configs(args)
    assert [port for _, port in configs] == [8000, 8001, 8002]
    assert [c.kv_events.endpoint for c, _ in configs] == [
        "tcp://*:5557",
        "tcp://*:5559",
        "tcp://*:5561",
    ]
    assert configs[2][0].kv_events.replay_endpoint == "tcp://*:6561"
    assert configs[0][0].engine.lora_adapters == {"a": "/p"}
    # Connecting engines all share the indexer's address.
    args = build_parser().parse_args(
        ["--engines", "2", "--kv-events-endpoint", "tcp://10.1.1.1:5557"]
    )
    assert {c.kv_events.endpoint for c, _ in server_configs(args)} == {"tcp://10.1.1.1:5557"}


def test_kv_events_config_json_like_vllm() -> None:
    cfg = {
        "enable_kv_cache_events": True,
        "publisher": "zmq",
        "endpoint": "tcp://*:7000",
        "replay_endpoint": "tcp://*:7100",
        "topic": "",
        "buffer_steps": 5,
        "hwm": 9,
    }
    args = build_parser().parse_args(["--engines", "2", "--kv-events-config", json.dumps(cfg)])
    (first, _), (second, _) = server_configs(args)
    assert (first.kv_events.endpoint, second.kv_events.endpoint) == ("tcp://*:7000", "tcp://*:7001")
    assert second.kv_events.replay_endpoint == "tcp://*:7101"
    assert first.kv_events.topic == "" and first.kv_events.buffer_steps == 5
    assert first.kv_events.hwm == 9
    off = build_parser().parse_args(["--kv-events-config", '{"enable_kv_cache_events": false}'])
    assert server_configs(off)[0][0].kv_events.endpoint is None


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--engines", "0"], "--engines must be positive"),
        (["--hash-algo", "md5"], "choose one of"),
        (["--lora", "nopath"], "NAME=PATH"),
        (["--kv-events-config", "{bad"], "not valid JSON"),
        (["--kv-events-config", '{"endpont": "x"}'], "unknown keys"),
        (["--kv-events-config", '{"hwm": -1}'], "positive integer"),
    ],
)
def test_bad_flags_exit_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_process_serves_and_stops() -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kvtools.sim.cli",
            "--engines",
            "2",
            "--base-port",
            "0",
            "--tokenizer",
            "bytes",
            "--kv-events-endpoint",
            "tcp://127.0.0.1:*",
            "--kv-replay-endpoint",
            "tcp://127.0.0.1:*",
            "--time-scale",
            "0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONHASHSEED": "0"},
    )
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline() for _ in range(2)]
        urls = [re.search(r"http (\S+)", line).group(1) for line in lines]  # type: ignore[union-attr]
        assert all("topic kv@127.0.0.1:" in line for line in lines)
        req = urllib.request.Request(
            urls[1] + "/v1/completions",
            data=json.dumps({"prompt": "x" * 40, "max_tokens": 2}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert resp.headers["x-kvsim-engine"] == "engine-1"
            assert json.load(resp)["usage"]["completion_tokens"] == 2
        replay = re.search(r"replay (\S+)", lines[1]).group(1)  # type: ignore[union-attr]
        (frames,) = replay_request(replay, 0)
        assert frames.seq == 0 and frames.topic == f"kv@{urls[1][7:]}@sim-model".encode()
        (event,) = frames.batch()[1]
        # PYTHONHASHSEED=0 in the engine's environment, so NONE_HASH is the seed-"0" one.
        expected = block_hashes([ord("x")] * 32, 16, "sha256_cbor", "0")
        assert event["block_hashes"] == [wire_value(d) for d in expected]
    finally:
        proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        while proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, proc.stderr.read() if proc.stderr else ""
