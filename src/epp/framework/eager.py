"""Coroutines driven eagerly: stepped in the caller until they first suspend, and only then
finished in a Task.

The picker's HTTP/2 edge runs each ext_proc handler this way (most decisions never wait on
anything, so they cost no Task and no event-loop round trip), and the scheduler bounds its
data producers without leaving the request's own task while a producer does not suspend:
a burst of requests is then placed one after the other, each seeing the picks before it."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Coroutine, Generator
from typing import Any, TypeVar

__all__ = ["Resume", "bounded"]

T = TypeVar("T")


class Resume:
    """Resume, inside a Task, a coroutine whose first step suspended on `pending`."""

    __slots__ = ("coro", "pending")

    def __init__(self, coro: Coroutine[Any, Any, Any], pending: Any) -> None:
        self.coro = coro
        self.pending = pending

    def __await__(self) -> Generator[Any, Any, Any]:
        coro, value = self.coro, self.pending
        while True:
            try:
                sent = yield value
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as exc:
                try:
                    value = coro.throw(exc)
                except StopIteration as stop:
                    return stop.value
            else:
                try:
                    value = coro.send(sent)
                except StopIteration as stop:
                    return stop.value


async def bounded(awaitable: Awaitable[T], timeout: float) -> T:
    """``await awaitable`` for at most ``timeout`` seconds (TimeoutError after), in the
    caller's task as long as it does not suspend. Inside a Task: ``asyncio.timeout``. Driven
    eagerly, outside any Task (where ``asyncio.timeout`` cannot work): a coroutine is stepped
    here, and only one that suspends is finished in a Task under ``asyncio.wait_for``."""
    if asyncio.current_task() is not None:
        async with asyncio.timeout(timeout):
            return await awaitable
    if inspect.iscoroutine(awaitable):
        try:
            first = awaitable.send(None)
        except StopIteration as done:
            result: T = done.value
            return result
        return await asyncio.wait_for(Resume(awaitable, first), timeout)  # type: ignore[arg-type]
    return await asyncio.wait_for(awaitable, timeout)
