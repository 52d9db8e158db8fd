"""Polling until something is true, the one way tests wait for a process or a server to get somewhere."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


def until(check: Callable[[], T], what: str, timeout: float = 15.0, *, interval: float = 0.1) -> T:
    """Call ``check`` every ``interval`` seconds until it returns something true, and return that; fail (an
    AssertionError saying ``what`` did not happen) after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not (value := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what} ({timeout:g} s)")
        time.sleep(interval)
    return value


async def until_async(check: Callable[[], T | Awaitable[T]], what: str, timeout: float = 15.0, *,
                      interval: float = 0.05) -> T:
    """``until`` on the event loop: ``check`` returns its answer or an awaitable of it, every ``interval`` seconds
    (sleeping without blocking the loop), until that answer is true; fails after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what} ({timeout:g} s)")
        await asyncio.sleep(interval)
