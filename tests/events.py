"""vLLM KV-event batches and ZMQ frames, built for every test package the same way.

The wire builders are written from /work/shared/reference/vllm-kv-events.md (sections 1-3),
independent of kvindex's decoder and of the simulator's encoder:

* an event is an :class:`Ev` (a type and its fields), made by :func:`stored`, :func:`removed`
  or :func:`cleared`, or ``Ev("SomethingNew", {...})`` for a type kvindex does not know;
* :func:`encode_event` writes one in the map encoding of vLLM 0.33 (``{"type": ..., fields}``,
  defaulted fields omitted) or the older array encoding (``["BlockStored", f1, f2, ...]``);
* :func:`encode_batch` makes the msgpack payload ``[ts, events, data_parallel_rank]``; raw
  lists and dicts among the events go on the wire as they are (hand-made or damaged events);
* :func:`frame` is a live message ``[topic, seq(8 bytes big-endian unsigned), payload]``;
  :data:`END_SEQ` is the seq frame of the replay end marker.

:func:`sim_stored` is the one builder on the simulator's own event classes
(:mod:`kvtools.sim.events`), for tests that publish through its ``EventPublisher``.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import msgspec

from kvtools.sim.events import BlockStored as SimBlockStored

__all__ = [
    "END_SEQ",
    "Encoding",
    "Ev",
    "RawEvent",
    "cleared",
    "encode_batch",
    "encode_event",
    "frame",
    "removed",
    "seq8",
    "sim_stored",
    "stored",
]

Encoding = Literal["map", "array"]

END_SEQ = (-1).to_bytes(8, "big", signed=True)
"""The seq frame of the replay end marker: -1 as 8 signed big-endian bytes."""

# BlockStored fields in vLLM's declaration order, with their defaults (None: required).
_STORED_REQUIRED = ("block_hashes", "parent_block_hash", "token_ids", "block_size", "lora_id")
_STORED_DEFAULTED = (
    ("medium", None),
    ("lora_name", None),
    ("extra_keys", None),
    ("group_idx", 0),
    ("kv_cache_spec_kind", "full_attention"),
    ("kv_cache_spec_sliding_window", None),
    ("locality", None),
    ("ownership", None),
    ("session_id", None),
    ("lookahead_token_ids", None),
)
_REMOVED_REQUIRED = ("block_hashes", "medium")
_REMOVED_DEFAULTED = (("group_idx", 0), ("locality", None), ("ownership", None))

_SCHEMAS: dict[str, tuple[tuple[str, ...], tuple[tuple[str, Any], ...]]] = {
    "BlockStored": (_STORED_REQUIRED, _STORED_DEFAULTED),
    "BlockRemoved": (_REMOVED_REQUIRED, _REMOVED_DEFAULTED),
    "AllBlocksCleared": ((), ()),
}


@dataclass
class Ev:
    """One event, independent of encoding."""

    type: str
    fields: dict[str, Any]


RawEvent = Ev | list[Any] | dict[str, Any]
"""What :func:`encode_batch` takes: an :class:`Ev`, or an already encoded event (sent as is)."""


def stored(
    hashes: Sequence[Any],
    parent: Any,
    tokens: Sequence[int],
    block_size: int = 16,
    **fields: Any,
) -> Ev:
    """A BlockStored of ``hashes`` (a chain under ``parent``, None for a root) holding
    ``tokens``. It carries vLLM's first seven fields (``lora_id`` and ``lora_name`` None,
    ``medium`` "GPU"); ``fields`` overrides them or adds later ones (``extra_keys``,
    ``group_idx``, ``kv_cache_spec_kind``, ...)."""
    event: dict[str, Any] = {
        "block_hashes": hashes,
        "parent_block_hash": parent,
        "token_ids": tokens,
        "block_size": block_size,
        "lora_id": None,
        "medium": "GPU",
        "lora_name": None,
    }
    event.update(fields)
    return Ev("BlockStored", event)


def removed(hashes: Sequence[Any], medium: str | None = "GPU", **fields: Any) -> Ev:
    """A BlockRemoved of ``hashes`` from ``medium``; ``fields`` adds e.g. ``group_idx``."""
    return Ev("BlockRemoved", {"block_hashes": hashes, "medium": medium, **fields})


def cleared() -> Ev:
    """An AllBlocksCleared (the engine reset its prefix cache)."""
    return Ev("AllBlocksCleared", {})


def encode_event(
    event: Ev, encoding: Encoding = "map", *, width: int | None = None, omit_defaults: bool = True
) -> Any:
    """``event`` as msgpack-ready data, fields in vLLM's declaration order.

    * ``"map"``: the required fields always, then the defaulted ones that differ from their
      default (vLLM 0.33's ``omit_defaults``), or with ``omit_defaults=False`` every field
      the event carries, default or not. Fields the schema does not know are dropped.
    * ``"array"``: the first ``width`` fields by position, a missing one as None; ``width``
      defaults to the required fields and two more (7 for BlockStored, as vLLM <= 0.25
      sent it; 4 for BlockRemoved).

    An event type kvindex does not know keeps its fields as given, after the tag, in both."""
    schema = _SCHEMAS.get(event.type)
    if schema is None:
        if encoding == "map":
            return {"type": event.type, **event.fields}
        return [event.type, *event.fields.values()]
    required, defaulted = schema
    if encoding == "map":
        out: dict[str, Any] = {"type": event.type}
        for name in required:
            out[name] = event.fields.get(name)
        for name, default in defaulted:
            if omit_defaults:
                value = event.fields.get(name, default)
                if value != default:
                    out[name] = value
            elif name in event.fields:
                out[name] = event.fields[name]
        return out
    names = [*required, *(name for name, _ in defaulted)]
    n = len(required) + min(2, len(defaulted)) if width is None else width
    return [event.type, *(event.fields.get(name) for name in names[:n])]


def encode_batch(
    events: Iterable[RawEvent],
    encoding: Encoding = "map",
    dp_rank: int | None = None,
    ts: float | None = None,
    *,
    width: int | None = None,
    omit_defaults: bool = True,
) -> bytes:
    """The msgpack payload ``[ts, events, dp_rank]`` (``ts`` None: now). :class:`Ev` events
    are written by :func:`encode_event` with ``encoding``, ``width`` and ``omit_defaults``;
    raw lists and dicts as they are."""
    body = [
        encode_event(e, encoding, width=width, omit_defaults=omit_defaults)
        if isinstance(e, Ev)
        else e
        for e in events
    ]
    return msgspec.msgpack.encode([time.time() if ts is None else ts, body, dp_rank])


def seq8(seq: int) -> bytes:
    """A seq frame: 8 bytes big-endian unsigned."""
    return seq.to_bytes(8, "big")


def frame(topic: bytes, seq: int, payload: bytes) -> list[bytes]:
    """One live message as a PUB sends it: ``[topic, seq8, payload]``."""
    return [topic, seq8(seq), payload]


def sim_stored(
    tokens: list[int],
    first_hash: int,
    *,
    lora: str | None = None,
    salt: str | None = None,
    block_size: int = 16,
) -> list[Any]:
    """One engine storing the full blocks of ``tokens`` as one chain (hashes ``first_hash``,
    ``first_hash + 1``, ...), as the simulator's event classes (a batch for
    ``kvtools.sim.publisher.EventPublisher.publish``). A LoRA sets ``lora_id`` 1 and
    ``lora_name``; a cache salt is the first block's extra key."""
    n = len(tokens) // block_size
    extra = [(salt,)] + [None] * (n - 1) if salt is not None else None
    return [
        SimBlockStored(
            block_hashes=list(range(first_hash, first_hash + n)),
            parent_block_hash=None,
            token_ids=tokens[: n * block_size],
            block_size=block_size,
            lora_id=1 if lora else None,
            medium="GPU",
            lora_name=lora,
            extra_keys=extra,
        )
    ]
