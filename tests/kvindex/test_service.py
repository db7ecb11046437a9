"""The service assembly in-process over real HTTP: /metrics, /healthz, /readyz, the route and
readiness hooks, and config loading (file + flags)."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from ingest_helpers import probe, wait_for
from vllm_publisher import VllmPublisher

from kvindex.config import ConfigError, ServiceConfig, load_config, parse_size
from kvindex.index import MemoryIndex
from kvindex.service.app import IndexService
from tests.events import stored


class DegradableIndex(MemoryIndex):
    """A backend reporting health the way the Redis backend can."""

    degraded: str | None = None

    def health(self) -> str | None:
        return self.degraded


async def test_http_endpoints_and_hooks() -> None:
    config = ServiceConfig(
        zmq_bind=["tcp://127.0.0.1:*"], accept_any_engine=True, http_host="127.0.0.1", http_port=0
    )
    backend = DegradableIndex()
    service = IndexService(config, index=backend)

    def install(app: web.Application, svc: IndexService) -> None:
        async def engines(request: web.Request) -> web.Response:
            return web.json_response(svc.index.engines())

        app.router.add_get("/v1/debug/engines", engines)

    service.add_routes(install)
    await service.start()
    base = f"http://127.0.0.1:{service.http_port}"
    pub = VllmPublisher(service.zmq_bound[0])
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(base + "/healthz") as r:
                assert r.status == 200
            async with http.get(base + "/readyz") as r:
                assert r.status == 200, await r.text()
            probe(pub, service.index, "127.0.0.1:8000")
            pub.publish(stored([1], None, list(range(16))))
            wait_for(lambda: service.index.resolve("127.0.0.1:8000", 1) is not None)
            async with http.get(base + "/metrics") as r:
                text = await r.text()
            assert 'kvindex_ingest_events_total{type="BlockStored"}' in text
            assert "kvindex_index_keys 2.0" in text  # probe block + block 1
            assert "kvindex_index_bytes" in text
            # the engine's first seen seq was > 0 (the probe's slow joiner) or 0: either way
            # in a scored state, its sync state exported (kvindex.sync)
            assert 'kvindex_engine_sync_state{engine="127.0.0.1:8000",state=' in text
            async with http.get(base + "/readyz") as r:
                engines = (await r.json())["engines"]
            assert sum(engines["counts"].values()) == 1
            assert engines["unsynced_scores"] == "withhold"
            async with http.get(base + "/v1/debug/engines") as r:
                assert await r.json() == ["127.0.0.1:8000"]
            backend.degraded = "redis unreachable"
            async with http.get(base + "/readyz") as r:
                assert r.status == 503
                assert (await r.json())["failing"] == {"index": "redis unreachable"}
            service.add_readiness_check("extra", lambda: None)
            backend.degraded = None
            async with http.get(base + "/readyz") as r:
                assert r.status == 200
        with pytest.raises(RuntimeError):
            service.add_routes(install)
    finally:
        pub.close()
        await service.stop()


async def test_readyz_fails_without_sockets() -> None:
    service = IndexService(ServiceConfig(http_host="127.0.0.1", http_port=0))
    await service.start()
    try:
        assert service.readiness() == {"ingest": "no subscriber sockets"}
    finally:
        await service.stop()


def test_backend_comes_from_the_factory_and_errors_name_the_flag() -> None:
    service = IndexService(ServiceConfig(backend="python"))
    assert type(service.index.inner) is MemoryIndex
    with pytest.raises(ConfigError, match=r"--backend 'nope': unknown index backend"):
        IndexService(ServiceConfig(backend="nope"))
    with pytest.raises(ConfigError, match=r"backend_options \['bogus'\]: unknown options"):
        IndexService(ServiceConfig(backend="redis", backend_options={"bogus": 1}))


def test_config_file_and_flag_precedence(tmp_path: Path) -> None:
    path = tmp_path / "kvindex.yaml"
    path.write_text(
        "zmq-bind: [tcp://*:5557]\n"
        "http_port: 9000\n"
        "block_size: 32\n"
        "replay_endpoints: {'10.0.0.1:8000': 'tcp://10.0.0.1:5558'}\n"
        "index_memory_budget: 2GiB\n"
        "engines:\n  - {endpoint: '10.0.0.1:8000', zmq: 'tcp://10.0.0.1:5557'}\n"
    )
    config = load_config(
        path,
        {
            "http_port": 9100,
            "block_size": None,
            "replay_endpoints": {"10.0.0.2:8000": "tcp://10.0.0.2:5558"},
        },
    )
    assert config.zmq_bind == ["tcp://*:5557"]
    assert config.http_port == 9100  # flag wins
    assert config.block_size == 32  # unset flag keeps the file's value
    assert set(config.replay_endpoints) == {"10.0.0.1:8000", "10.0.0.2:8000"}
    assert config.memory_budget_bytes() == 2 * 1024**3
    assert config.engines[0].zmq == "tcp://10.0.0.1:5557"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("http_port: 1\nblock_size: lots\n", r"kvindex.yaml:2: block_size: Expected `int`"),
        ("http_port: 1\nhtp_port: 2\n", r"kvindex.yaml:2: htp_port: Object contains unknown field"),
        (
            "engines:\n  - endpoint: 1.2.3.4:80\n    dp_size: x\n",
            r"kvindex.yaml:3: engines.0.dp_size",
        ),
        ("a: [1, 2\n", r"kvindex.yaml:2: invalid YAML"),
        ("- 1\n", r"must be a mapping"),
    ],
)
def test_bad_config_file_messages(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "kvindex.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_bad_flag_values() -> None:
    with pytest.raises(ConfigError, match="--block-size"):
        load_config(None, {"block_size": 0})
    with pytest.raises(ConfigError, match="--zmq-bind"):
        load_config(None, {"zmq_bind": ["localhost:5557"]})
    with pytest.raises(ConfigError, match="is not a size"):
        load_config(None, {"index_memory_budget": "lots"})
    assert parse_size("512MB") == 512_000_000
    assert parse_size("1.5g") == 1_500_000_000  # decimal unless "i" (GiB)
    assert parse_size("1.5Gi") == int(1.5 * 1024**3)


def test_serve_flags_build_config(tmp_path: Path) -> None:
    from kvindex.cli import build_parser
    from kvindex.commands.serve import config_from_args

    path = tmp_path / "c.json"
    path.write_text('{"http_port": 7000, "zmq_bind": ["tcp://*:1"], "index_groups": ["x"]}')
    args = build_parser().parse_args(
        [
            "serve",
            "--config",
            str(path),
            "--zmq-bind",
            "tcp://*:2",
            "--zmq-bind",
            "tcp://*:3",
            "--replay-endpoint",
            "1.2.3.4:8000=tcp://1.2.3.4:5558",
            "--k8s-selector",
            "app=vllm",
            "--k8s-replay-port",
            "5558",
        ]
    )
    config = config_from_args(args)
    assert config.http_port == 7000
    assert config.zmq_bind == ["tcp://*:2", "tcp://*:3"]  # a list flag replaces the file's
    assert config.index_groups == ["x"]
    assert config.replay_endpoints == {"1.2.3.4:8000": "tcp://1.2.3.4:5558"}
    assert config.kubernetes is not None
    assert (config.kubernetes.label_selector, config.kubernetes.replay_port) == ("app=vllm", 5558)
    bad = build_parser().parse_args(["serve", "--replay-endpoint", "tcp://x:1"])
    with pytest.raises(ConfigError, match="ENGINE=URL"):
        config_from_args(bad)
    orphan = build_parser().parse_args(["serve", "--k8s-namespace", "x"])
    with pytest.raises(ConfigError, match="--k8s-selector"):
        config_from_args(orphan)


async def test_grpc_servicers_hook_and_port_in_use() -> None:
    import grpc

    from tests.ports import free_port

    async def ping(request: bytes, context: object) -> bytes:
        return b"pong:" + request

    def install(server: grpc.aio.Server, svc: IndexService) -> None:
        handler = grpc.method_handlers_generic_handler(
            "test.Echo", {"Ping": grpc.unary_unary_rpc_method_handler(ping)}
        )
        server.add_generic_rpc_handlers((handler,))

    port = free_port()
    config = ServiceConfig(http_host="127.0.0.1", http_port=0, grpc_port=port)
    service = IndexService(config)
    service.grpc_servicers.append(install)
    await service.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{service.grpc_port}") as channel:
            reply = await channel.unary_unary("/test.Echo/Ping")(b"x", timeout=5)
            assert reply == b"pong:x"
        second = IndexService(config)
        second.grpc_servicers.append(install)
        try:
            with pytest.raises(OSError, match=f"gRPC port {port} is in use"):
                await second.start()
        finally:
            await second.stop()
    finally:
        await service.stop()
