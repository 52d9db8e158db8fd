"""A front end's side of calls through ``gateway.calls`` (``Caller``), the calls' tenants (the ``registry``
fixture, tests/conftest.py: acme, and tight with a one-call limit) and a Calls that runs once its workers register."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gateway.calls import AgentCall, Calls, EndReason
from gateway.tenants.registry import TenantRegistry
from gateway.worker_client import AgentAudio
from personagate_common.routing import Router
from tests.helpers.wait import scaled, until_async

FRAME = 0.08  # seconds of audio in one caller frame
CALL_TENANTS = """\
tenant: {tenant}
name: {tenant}
numbers:
  "{number}": claims
personas:
  claims:
    prompt: You are a claims agent. Take down the details of the caller's claim.
    voice: {{preset: NATF0}}
limits:
  max_concurrent_calls: {limit}
"""
ACME, TIGHT = "+14155550100", "+14155550199"


def write_call_tenants(root: Path) -> TenantRegistry:
    """acme (ACME, 10 calls) and tight (TIGHT, 1 call) under ``root``, loaded."""
    for tenant, number, limit in (("acme", ACME, 10), ("tight", TIGHT, 1)):
        (root / tenant).mkdir()
        (root / tenant / "tenant.yaml").write_text(CALL_TENANTS.format(tenant=tenant, number=number, limit=limit))
    registry = TenantRegistry(root)
    assert registry.reload().ok, registry.status.problems
    return registry


@contextlib.asynccontextmanager
async def running(calls: Calls, expect_workers: int) -> AsyncIterator[Calls]:
    """``calls`` started, once ``expect_workers`` workers are alive and not draining."""
    async with calls:
        await until_async(lambda: alive(calls.router, expect_workers),
                          f"{expect_workers} workers registered", timeout=10)
        yield calls


async def alive(router: Router, n: int) -> bool:
    """Whether at least ``n`` workers are alive and not draining."""
    return sum(w.alive and not w.draining for w in await router.workers()) >= n


@dataclass
class Caller:
    """A front end's side of one call: a caller frame every 80 ms (speech-like noise), agent events
    noted with when they came, whether they were comfort noise, and which worker the call was on."""

    call: AgentCall
    audio: list[tuple[float, bool, str | None]] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._talk = asyncio.create_task(self._talking())
        self._listen = asyncio.create_task(self._listening())

    async def _talking(self) -> None:
        rng = np.random.default_rng(1)
        began = time.monotonic()
        for i in range(10**6):
            self.call.send((rng.standard_normal(1920) * 3000).astype("<i2").tobytes())
            await asyncio.sleep(max(0.0, began + (i + 1) * FRAME - time.monotonic()))

    async def _listening(self) -> None:
        async for event in self.call.frames():
            if isinstance(event, AgentAudio):
                assert len(event.pcm) == 3840
                self.audio.append((time.monotonic(), event.filler, self.call.worker_id))
            else:
                self.texts.append(event.text)

    def frames_since(self, since: float, *, filler: bool | None = None) -> int:
        return sum(1 for t, f, _ in self.audio if t >= since and (filler is None or f == filler))

    def largest_gap(self, since: float, until_: float | None = None) -> float:
        end = until_ if until_ is not None else time.monotonic()
        times = [since] + [t for t, _, _ in self.audio if since <= t <= end] + [end]
        return float(max(np.diff(times)))

    async def hang_up(self) -> str:
        self._talk.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._talk
        await self.call.end(EndReason.HANGUP)
        await asyncio.wait_for(self._listen, scaled(5))
        return await self.call.wait_ended()

    async def stop(self) -> None:
        self._talk.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._talk
        await asyncio.wait_for(self._listen, scaled(10))


def route(registry: TenantRegistry, number: str):
    """The tenant and persona ``number`` reaches: what ``Calls.start`` takes."""
    tenant, persona = registry.route(number)
    return tenant, persona
