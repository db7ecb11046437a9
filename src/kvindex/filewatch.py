"""One watched file, as the index's engines file and the picker's endpoints file are watched.

:class:`WatchedFile` is the step: stat the file, and when its mtime or size changed, read and
parse it; a good parse goes to ``on_load``, a failure (missing, unreadable, invalid) to
``on_error`` once (the caller keeps its last good set). It owns no thread and no loop; two
thin edges repeat it: :class:`PollingThread` (the index service's discovery threads) and
:func:`poll_every` (the picker's event loop).
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Generic, TypeVar

from kvindex.threads import named_thread

__all__ = ["PollingThread", "WatchedFile", "poll_every"]

T = TypeVar("T")


class WatchedFile(Generic[T]):
    """A file re-read when its mtime or size changes. ``parse(text)`` turns its text into a
    value and raises ValueError with a message naming the file when it cannot."""

    def __init__(self, path: str | os.PathLike[str], parse: Callable[[str], T]) -> None:
        self.path = Path(path)
        self.parse = parse
        self.last_error: str | None = None  # the current failure (None after a good load)
        self.loads = 0
        self._stamp: tuple[int, int] | None = None

    def reset(self) -> None:
        """Forget what was seen: the next poll reads the file again."""
        self._stamp = None
        self.last_error = None

    def poll(self, on_load: Callable[[T], None], on_error: Callable[[str], None]) -> bool:
        """One check; True when a new value went to ``on_load``. A failure goes to
        ``on_error`` once: again only when the file or the message changes."""
        try:
            st = self.path.stat()
        except OSError as exc:
            return self._fail(f"cannot read {self.path}: {exc.strerror}", None, on_error)
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp == self._stamp:
            return False
        try:
            value = self.parse(self.path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as exc:
            return self._fail(f"cannot read {self.path}: {exc}", stamp, on_error)
        except ValueError as exc:
            return self._fail(str(exc), stamp, on_error)
        self._stamp = stamp
        self.last_error = None
        self.loads += 1
        on_load(value)
        return True

    def _fail(
        self, message: str, stamp: tuple[int, int] | None, on_error: Callable[[str], None]
    ) -> bool:
        if stamp == self._stamp and message == self.last_error:
            return False  # the same failure as last poll: reported already
        self._stamp = stamp
        self.last_error = message
        on_error(message)
        return False


class PollingThread:
    """Calls ``poll`` every ``interval_s`` on a daemon thread until :meth:`stop`."""

    def __init__(self, name: str, poll: Callable[[], object], interval_s: float) -> None:
        self.name = name
        self.poll = poll
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._stop.clear()
        self._thread = named_thread(self._run, self.name)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.poll()
            self._stop.wait(self.interval_s)

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=timeout)


async def poll_every(poll: Callable[[], object], interval_s: float) -> None:
    """Calls ``poll`` every ``interval_s`` on the running event loop until cancelled."""
    while True:
        poll()
        await asyncio.sleep(interval_s)
