"""`kvindex inspect ENDPOINT|FILE`: print decoded KV events live from a ZMQ endpoint or from a
capture file (`kvindex record`), with topic, seq, DP rank, gaps and restarts.

ENDPOINT follows vLLM's rule: an address with ``*`` (``tcp://*:5557``) is bound (engines
connect to it); otherwise it is an engine's PUB and is connected to."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator
from typing import Any, TextIO

import msgspec
import zmq

from kvindex.capture import CaptureError, read_capture
from kvindex.commands._stream import add_stream_flags, messages, open_error
from kvindex.ingest import SeqAction, SequenceTracker
from kvindex.subscriber import BadMessage, LiveMessage
from kvindex.wire import AllBlocksCleared, BlockRemoved, BlockStored, Event, decode_batch

EXIT_USAGE = 2


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "inspect",
        help="print decoded KV events from a ZMQ endpoint or a capture file",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("source", metavar="ENDPOINT|FILE")
    parser.add_argument("--json", action="store_true", help="one JSON object per message")
    add_stream_flags(parser)
    parser.set_defaults(func=run)


def _hash(value: int | bytes | None) -> int | str | None:
    return value.hex() if isinstance(value, bytes) else value


def event_dict(event: Event) -> dict[str, Any]:
    out: dict[str, Any] = {"type": type(event).__name__}
    if isinstance(event, BlockStored):
        out.update(
            block_hashes=[_hash(h) for h in event.block_hashes],
            parent_block_hash=_hash(event.parent_block_hash),
            tokens=len(event.token_ids),
            block_size=event.block_size,
            medium=event.medium,
            lora_name=event.lora_name,
            group_idx=event.group_idx,
            kv_cache_spec_kind=event.kv_cache_spec_kind,
            extra_keys=msgspec.to_builtins(event.extra_keys, enc_hook=repr)
            if event.extra_keys
            else None,
        )
    elif isinstance(event, BlockRemoved):
        out.update(
            block_hashes=[_hash(h) for h in event.block_hashes],
            medium=event.medium,
            group_idx=event.group_idx,
        )
    return out


def _event_line(event: Event) -> str:
    if isinstance(event, AllBlocksCleared):
        return "AllBlocksCleared"
    d = event_dict(event)
    kind = d.pop("type")
    parts = [f"{k}={v}" for k, v in d.items() if v is not None]
    return f"{kind} " + " ".join(parts)


class Printer:
    def __init__(self, out: TextIO, as_json: bool) -> None:
        self.out = out
        self.as_json = as_json
        self.tracker = SequenceTracker()

    def frame(self, topic: bytes, seq: int, payload: bytes, received_at: float) -> None:
        batch = decode_batch(payload)
        stream = f"{topic.decode('utf-8', 'replace')}#{batch.data_parallel_rank}"
        previous = self.tracker.last(stream)
        action = self.tracker.observe(stream, seq)
        gap = seq - previous - 1 if action is SeqAction.GAP and previous is not None else None
        record: dict[str, Any] = {
            "topic": topic.decode("utf-8", "replace"),
            "seq": seq,
            "received_at": received_at,
            "ts": batch.ts,
            "dp_rank": batch.data_parallel_rank,
            "gap": gap,
            "restart": action is SeqAction.RESET,
            "duplicate": action is SeqAction.DUPLICATE,
            "unknown_events": batch.unknown,
            "malformed_events": batch.malformed,
            "error": batch.error,
        }
        if self.as_json:
            record["events"] = [event_dict(e) for e in batch.events]
            self.out.write(json.dumps(record) + "\n")
        else:
            head = (
                f"seq={seq} topic={record['topic']} rank={batch.data_parallel_rank} "
                f"ts={batch.ts:.6f} events={len(batch.events)}"
            )
            if batch.unknown or batch.malformed:
                head += f" unknown={batch.unknown} malformed={batch.malformed}"
            self.out.write(head + "\n")
            if gap:
                self.out.write(
                    f"  ! gap: expected seq {previous + 1 if previous is not None else '?'}"
                    f", got {seq} ({gap} batches missing)\n"
                )
            if action is SeqAction.RESET:
                self.out.write(f"  ! restart: seq back to {seq} (was {previous})\n")
            if action is SeqAction.DUPLICATE:
                self.out.write("  ! duplicate seq\n")
            if batch.error:
                self.out.write(f"  ! undecodable payload: {batch.error}\n")
            for event in batch.events:
                self.out.write("  " + _event_line(event) + "\n")
        self.out.flush()

    def bad(self, message: BadMessage) -> None:
        if self.as_json:
            self.out.write(
                json.dumps({"malformed_frame": message.reason, "detail": message.detail}) + "\n"
            )
        else:
            self.out.write(f"! malformed frame ({message.reason}): {message.detail}\n")
        self.out.flush()


def _from_file(path: str) -> Iterator[tuple[bytes, int, bytes, float]]:
    for frame in read_capture(path):
        yield frame.topic, frame.seq, frame.payload, frame.received_at


def run(args: argparse.Namespace) -> int:
    printer = Printer(sys.stdout, args.json)
    source: str = args.source
    if "://" not in source:
        if not os.path.exists(source):
            print(
                f"kvindex inspect: {source}: no such capture file (or give tcp://... / "
                "ipc://... for a live endpoint)",
                file=sys.stderr,
            )
            return EXIT_USAGE
        try:
            for i, (topic, seq, payload, received_at) in enumerate(_from_file(source)):
                if args.count is not None and i >= args.count:
                    break
                printer.frame(topic, seq, payload, received_at)
        except CaptureError as exc:
            print(f"kvindex inspect: {exc}", file=sys.stderr)
            return EXIT_USAGE
        except BrokenPipeError:
            return 0
        return 0
    try:
        for message in messages(args, source):
            if isinstance(message, LiveMessage):
                f = message.frame
                printer.frame(f.topic, f.seq, f.payload, message.received_at)
            else:
                printer.bad(message)
    except zmq.ZMQError as exc:
        print(f"kvindex inspect: {open_error(source, exc)}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:
        return 0
    return 0
