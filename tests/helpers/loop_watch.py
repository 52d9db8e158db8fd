"""How long the event loop kept a task waiting while a test did something else: a task that asks
for the loop every 10 ms records the longest delay it saw.

    async with LoopWatch() as watch:
        ...                                  # attack the gateway in-process
    assert watch.longest < 3.0
"""

from __future__ import annotations

import asyncio
import time
from typing import Self

TICK_S = 0.01


class LoopWatch:
    """The longest time (s) past its 10 ms sleep that a ticking task waited for the event loop."""

    def __init__(self) -> None:
        self.longest = 0.0
        self._task: asyncio.Task[None] | None = None

    async def _tick(self) -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(TICK_S)
            now = time.monotonic()
            self.longest = max(self.longest, now - last - TICK_S)
            last = now

    async def __aenter__(self) -> Self:
        self._task = asyncio.create_task(self._tick())
        await asyncio.sleep(5 * TICK_S)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
