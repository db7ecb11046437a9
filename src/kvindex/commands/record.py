"""`kvindex record ENDPOINT -o FILE`: capture raw KV-event frames (topic, seq, payload and
receive time) to a capture file (format in docs/ingest.md; read it with
`kvindex inspect FILE` or `kvindex.capture.read_capture`).

ENDPOINT follows vLLM's rule: with ``*`` it is bound, otherwise connected to."""

from __future__ import annotations

import argparse
import sys
from typing import Any

import zmq

from kvindex.capture import CaptureWriter
from kvindex.commands._stream import add_stream_flags, messages, open_error
from kvindex.subscriber import LiveMessage

EXIT_USAGE = 2


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "record",
        help="capture raw KV-event frames to a file",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("endpoint", metavar="ENDPOINT")
    parser.add_argument("-o", "--output", required=True, metavar="FILE")
    add_stream_flags(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        writer = CaptureWriter(args.output, source=args.endpoint, topic_filter=args.topic_filter)
    except OSError as exc:
        print(f"kvindex record: cannot write {args.output}: {exc.strerror}", file=sys.stderr)
        return EXIT_USAGE
    malformed = 0
    try:
        with writer:
            for message in messages(args, args.endpoint):
                if isinstance(message, LiveMessage):
                    f = message.frame
                    writer.write(f.topic, f.seq, f.payload, message.received_at)
                    if writer.count % 64 == 0:
                        writer.flush()
                else:
                    malformed += 1
    except zmq.ZMQError as exc:
        print(f"kvindex record: {open_error(args.endpoint, exc)}", file=sys.stderr)
        return EXIT_USAGE
    print(
        f"kvindex record: {writer.count} frames written to {args.output}"
        + (f" ({malformed} malformed messages skipped)" if malformed else ""),
        file=sys.stderr,
    )
    return 0
