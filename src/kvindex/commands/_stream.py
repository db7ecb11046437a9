"""Shared by `kvindex inspect` and `kvindex record`: open a SUB socket on an endpoint the way
vLLM's rule implies (an address with ``*`` or ``::`` is one the engines connect to, so we
bind; anything else is an engine's PUB, so we connect) and iterate messages until a count,
a duration or a signal ends it."""

from __future__ import annotations

import argparse
import signal
import threading
import time
from collections.abc import Iterator
from types import FrameType

import zmq

from kvindex.subscriber import BadMessage, LiveMessage, ZmqSubscriber

__all__ = ["add_stream_flags", "messages", "should_bind"]


def should_bind(endpoint: str) -> bool:
    return "*" in endpoint or "::" in endpoint


def add_stream_flags(parser: argparse.ArgumentParser) -> None:
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--bind", action="store_true", help="bind even without '*' in ENDPOINT")
    mode.add_argument("--connect", action="store_true", help="connect even with '*'")
    parser.add_argument("--topic-filter", default="", help="SUB topic prefix (default: all)")
    parser.add_argument("--count", type=int, help="stop after N messages")
    parser.add_argument("--duration", type=float, help="stop after S seconds")


def messages(args: argparse.Namespace, endpoint: str) -> Iterator[LiveMessage | BadMessage]:
    """Live messages until --count / --duration / SIGINT / SIGTERM. Raises zmq.ZMQError when
    the endpoint cannot be opened."""
    subscriber = ZmqSubscriber(args.topic_filter)
    stopping = False

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, on_signal) if main else None
    try:
        bind = args.bind or (should_bind(endpoint) and not args.connect)
        if bind:
            subscriber.bind(endpoint)
        else:
            subscriber.connect(endpoint)
        deadline = None if args.duration is None else time.monotonic() + args.duration
        seen = 0
        while not stopping:
            if deadline is not None and time.monotonic() >= deadline:
                return
            for message in subscriber.poll(100):
                if isinstance(message, LiveMessage | BadMessage):
                    yield message
                    seen += 1
                    if args.count is not None and seen >= args.count:
                        return
    except KeyboardInterrupt:
        return
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)
        subscriber.close()


def open_error(endpoint: str, exc: zmq.ZMQError) -> str:
    if exc.errno == zmq.EADDRINUSE:
        return f"{endpoint} is in use by another process: pick another endpoint"
    return f"cannot open {endpoint}: {exc}"
