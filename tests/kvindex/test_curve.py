"""ZMQ CURVE on the event sockets, over real ZMQ on loopback: a bind socket as a CURVE
server admits only the listed client keys (others are refused at the handshake and counted;
plain publishers get nothing through), and connect sockets reach CURVE-serving engines."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq
import zmq.auth
from ingest_helpers import keys_for, metric, wait_for

from kvindex.curve import CurveConfig, load_curve
from kvindex.errors import ConfigError
from kvindex.index import MemoryIndex
from kvindex.index.locked import LockedIndex
from kvindex.ingest_service import IngestService, IngestServiceConfig
from kvindex.metrics import KvindexMetrics
from tests.events import encode_batch, frame, stored

T = list(range(32))
ENGINE = "127.0.0.1:8000"
TOPIC = f"kv@{ENGINE}@m".encode()


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, Path]:
    made: dict[str, Path] = {}
    for name in ("index", "engine", "stranger"):
        (tmp_path / name).mkdir()
        public, secret = zmq.auth.create_certificates(tmp_path / name, name)
        made[name] = Path(secret)
        made[name + ".pub"] = Path(public)
    clients = tmp_path / "clients"
    clients.mkdir()
    (clients / "engine.key").write_bytes(made["engine.pub"].read_bytes())
    made["clients"] = clients
    return made


@pytest.fixture
def context() -> Iterator[zmq.Context[zmq.Socket[bytes]]]:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


def start(config: IngestServiceConfig) -> tuple[IngestService, LockedIndex, KvindexMetrics]:
    index = LockedIndex(MemoryIndex())
    metrics = KvindexMetrics()
    service = IngestService(config, index, metrics=metrics)
    service.open()
    service.start()
    return service, index, metrics


def curve_socket(
    ctx: zmq.Context[zmq.Socket[bytes]], cert: Path, server: Path | None
) -> zmq.Socket[bytes]:
    public, secret = zmq.auth.load_certificate(cert)
    sock = ctx.socket(zmq.PUB)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, public)
    assert secret is not None
    sock.setsockopt(zmq.CURVE_SECRETKEY, secret)
    if server is None:
        sock.setsockopt(zmq.CURVE_SERVER, 1)
    else:
        sock.setsockopt(zmq.CURVE_SERVERKEY, zmq.auth.load_certificate(server)[0])
    return sock


def indexed(index: LockedIndex) -> bool:
    return ENGINE in index.lookup(keys_for(T))


def test_bind_socket_admits_only_listed_client_keys(
    keys: dict[str, Path], context: zmq.Context[zmq.Socket[bytes]]
) -> None:
    curve = load_curve(str(keys["index"]), str(keys["clients"]))
    assert curve is not None and curve.allowed_clients is not None
    service, index, metrics = start(
        IngestServiceConfig(zmq_bind=("tcp://127.0.0.1:*",), accept_any_engine=True, curve=curve)
    )
    endpoint = service.subscriber.bound[0]
    plain = context.socket(zmq.PUB)
    plain.connect(endpoint)
    stranger = curve_socket(context, keys["stranger"], keys["index.pub"])
    stranger.connect(endpoint)
    engine = curve_socket(context, keys["engine"], keys["index.pub"])
    engine.connect(endpoint)
    payload = encode_batch([stored([1, 2], None, T)])
    try:
        # Strangers first: refused (counted), nothing indexed.
        deadline = time.monotonic() + 10
        while metric(metrics, "kvindex_ingest_refused_peers_total") < 1:
            assert time.monotonic() < deadline
            stranger.send_multipart(frame(TOPIC, 0, payload))
            plain.send_multipart(frame(TOPIC, 0, payload))
            time.sleep(0.02)
        for _ in range(20):
            stranger.send_multipart(frame(TOPIC, 0, payload))
            plain.send_multipart(frame(TOPIC, 0, payload))
        assert not indexed(index)
        # The admitted engine gets through.
        seq = 0

        def through() -> bool:
            nonlocal seq
            engine.send_multipart(frame(TOPIC, seq, payload))
            seq += 1
            return indexed(index)

        wait_for(through, what="the admitted CURVE client's batch")
        assert metric(metrics, "kvindex_ingest_batches_total") >= 1
    finally:
        service.stop()


def test_connect_sockets_reach_curve_serving_engines(
    keys: dict[str, Path], context: zmq.Context[zmq.Socket[bytes]]
) -> None:
    engine = curve_socket(context, keys["engine"], None)
    port = engine.bind_to_random_port("tcp://127.0.0.1")
    curve = load_curve(str(keys["index"]), server_key_file=str(keys["engine.pub"]))
    assert isinstance(curve, CurveConfig) and curve.server_key is not None
    service, index, _ = start(
        IngestServiceConfig(zmq_connect=(f"tcp://127.0.0.1:{port}",), curve=curve)
    )
    payload = encode_batch([stored([1, 2], None, T)])
    seq = 0

    def through() -> bool:
        nonlocal seq
        engine.send_multipart(frame(TOPIC, seq, payload))
        seq += 1
        return indexed(index)

    try:
        wait_for(through, what="a batch from the CURVE-serving engine")
    finally:
        service.stop()


def test_bad_curve_settings_name_the_flag(keys: dict[str, Path], tmp_path: Path) -> None:
    assert load_curve(None) is None
    with pytest.raises(ConfigError, match="--zmq-curve-cert"):
        load_curve(None, str(keys["clients"]))
    with pytest.raises(ConfigError, match=r"--zmq-curve-cert .*no secret key"):
        load_curve(str(keys["index.pub"]))
    with pytest.raises(ConfigError, match=r"--zmq-curve-cert .*not a ZMQ certificate"):
        load_curve(str(tmp_path / "missing"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match=r"--zmq-curve-clients .*no \*\.key"):
        load_curve(str(keys["index"]), str(empty))
