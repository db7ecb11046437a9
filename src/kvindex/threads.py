"""Background threads named in the OS as well as in Python, so `top -H`, `ps -L` and
`/proc/<pid>/task/*/comm` show which of a process's threads spends the CPU (before 3.14
CPython keeps a thread's name to itself); the routing benchmark reads them to split the
picker's CPU into event ingest and the request path."""

from __future__ import annotations

import ctypes
import sys
import threading
from collections.abc import Callable

__all__ = ["OS_NAME_MAX", "named_thread", "set_os_thread_name"]

OS_NAME_MAX = 15  # Linux: 16 bytes with the terminating NUL; longer names are cut
_PR_SET_NAME = 15


def set_os_thread_name(name: str) -> bool:
    """Name the calling thread in the OS (Linux `prctl(PR_SET_NAME)`, cut to 15 bytes).
    False where it cannot (another OS, no libc): a name is a convenience, never an error."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(_PR_SET_NAME, name.encode()[:OS_NAME_MAX], 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def named_thread(
    target: Callable[[], object], name: str, *, daemon: bool = True
) -> threading.Thread:
    """A thread (not started) that runs `target` under `name`, in Python and in the OS."""

    def run() -> None:
        set_os_thread_name(name)
        target()

    return threading.Thread(target=run, name=name, daemon=daemon)
