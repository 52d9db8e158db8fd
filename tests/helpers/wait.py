"""Waiting in the tests: the one speed factor every helper's timeout is scaled by, and polling until something is
true (the one way tests wait for a process or a server to get somewhere).

``PERSONAGATE_TEST_TIMEOUT_FACTOR`` (default 1) multiplies every timeout the helpers wait with (``until``,
``until_async``, a server's start, a session's ready, a caller's end): on a slow or loaded machine set it to 2 or 3
and the waits stretch while what the tests assert stays as written (docs/testing.md).
"""

from __future__ import annotations

import asyncio
import inspect
import os
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


def _factor() -> float:
    raw = os.environ.get("PERSONAGATE_TEST_TIMEOUT_FACTOR", "").strip()
    if not raw:
        return 1.0
    try:
        factor = float(raw)
    except ValueError:
        raise ValueError(f"PERSONAGATE_TEST_TIMEOUT_FACTOR must be a number, got {raw!r}") from None
    if not factor > 0:
        raise ValueError(f"PERSONAGATE_TEST_TIMEOUT_FACTOR must be above 0, got {raw!r}")
    return factor


TIMEOUT_FACTOR = _factor()  # read once, when the tests start


def scaled(seconds: float) -> float:
    """``seconds`` of waiting, stretched by PERSONAGATE_TEST_TIMEOUT_FACTOR: for timeouts, never for what a test
    asserts about how long something took."""
    return seconds * TIMEOUT_FACTOR


def until(check: Callable[[], T], what: str, timeout: float = 15.0, *, interval: float = 0.1) -> T:
    """Call ``check`` every ``interval`` seconds until it returns something true, and return that; fail (an
    AssertionError saying ``what`` did not happen) after ``timeout`` seconds (scaled)."""
    timeout = scaled(timeout)
    deadline = time.monotonic() + timeout
    while not (value := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what} ({timeout:g} s)")
        time.sleep(interval)
    return value


async def until_async(check: Callable[[], T | Awaitable[T]], what: str, timeout: float = 15.0, *,
                      interval: float = 0.05) -> T:
    """``until`` on the event loop: ``check`` returns its answer or an awaitable of it, every ``interval`` seconds
    (sleeping without blocking the loop), until that answer is true; fails after ``timeout`` seconds (scaled)."""
    timeout = scaled(timeout)
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
