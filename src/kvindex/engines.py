"""Engine identity: which endpoint (the picker's ``ip:port`` key) a stream of events is from.

vLLM publishes a topic frame, by llm-d convention ``kv@<pod-ip>:<port>@<model>``. The port is
the engine's serving port (the picker's endpoint port). With data parallelism each rank has
its own publisher and sets ``data_parallel_rank`` in every batch; rank ``r`` of an engine
whose topic names port ``p`` is the endpoint ``ip:(p + r * dp_port_stride)`` (stride 1 by
default: vLLM's per-rank API servers take consecutive ports), unless ``dp_port_stride`` is 0,
in which case every rank maps to the same endpoint.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvindex.errors import KVIndexError

__all__ = [
    "DEFAULT_KV_EVENTS_ENDPOINT",
    "DEFAULT_KV_EVENTS_PORT",
    "DEFAULT_MAX_ENGINES",
    "DEFAULT_MAX_TOPIC_BYTES",
    "MAX_ENGINES_LIMIT",
    "EngineId",
    "TopicError",
    "parse_topic",
]

# vLLM's default KV-event publisher endpoint (``--kv-events-config`` ``endpoint``) and its
# port; llm-d's ``zmqEndpoint`` and ``podDiscoveryConfig.socketPort`` default to them too.
DEFAULT_KV_EVENTS_PORT = 5557
DEFAULT_KV_EVENTS_ENDPOINT = f"tcp://*:{DEFAULT_KV_EVENTS_PORT}"
# Engines (topic endpoints) tracked at once. Every engine costs a stream, an activity record
# and metric label values, so an invented topic per frame must not grow them without end.
DEFAULT_MAX_ENGINES = 4096
# The most any index can hold: the C index's engine slots (native.h MAX_SLOTS; a test checks).
MAX_ENGINES_LIMIT = 65_536
# llm-d's topics are kv@<ip>:<port>@<model>; a longer one is refused before it is parsed,
# logged or kept anywhere.
DEFAULT_MAX_TOPIC_BYTES = 1024


class TopicError(KVIndexError, ValueError):
    """A topic that does not name an engine."""


@dataclass(frozen=True, slots=True)
class EngineId:
    host: str
    port: int | None
    model: str | None

    def endpoint(self, dp_rank: int | None = None, dp_port_stride: int = 1) -> str:
        """The endpoint key ``ip:port`` (IPv6 in brackets) of this engine or one of its ranks;
        just the host when the topic carried no port (a misconfiguration: it will not match
        the picker's endpoints)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        if self.port is None:
            return host
        return f"{host}:{self.port + (dp_rank or 0) * dp_port_stride}"


def parse_topic(topic: str | bytes, default_model: str | None = None) -> EngineId:
    """Parse ``kv@<host>[:<port>]@<model>`` (model may contain ``@``; IPv6 hosts as
    ``[addr]:port``). Raises TopicError for topics that do not follow the convention."""
    text = topic.decode("utf-8", "replace") if isinstance(topic, bytes) else topic
    parts = text.split("@", 2)
    if len(parts) < 2 or parts[0] != "kv" or not parts[1]:
        raise TopicError(f"topic {text!r} is not of the form kv@<ip>:<port>@<model>")
    address = parts[1]
    model = parts[2] if len(parts) == 3 and parts[2] else default_model
    host, port = address, None
    if address.startswith("["):
        end = address.find("]")
        if end < 0:
            raise TopicError(f"topic {text!r}: unterminated IPv6 address")
        host, rest = address[1:end], address[end + 1 :]
        if rest.startswith(":"):
            port = _port(rest[1:], text)
    elif address.count(":") == 1:
        host, raw_port = address.split(":")
        port = _port(raw_port, text)
    return EngineId(host=host, port=port, model=model)


def _port(raw: str, topic: str) -> int:
    if not raw.isdigit() or not 0 < int(raw) < 65536:
        raise TopicError(f"topic {topic!r}: bad port {raw!r}")
    return int(raw)
