"""A worker with ``redis_url`` announces itself to the gateways' routing store (a real redis-server, the
``redis_server`` fixture): alive with its slots, the calls it serves, draining on SIGTERM, and back by itself
after Redis lost everything, while its calls never notice."""

from __future__ import annotations

import asyncio
import signal
import time
import uuid

import httpx
import pytest

from personagate_common.routing import RedisRouter, Refusal, WorkerSnapshot
from tests.helpers.wait import until_async
from tests.helpers.worker import TalkingSession, exit_status, own_worker


async def _snapshot(router: RedisRouter, worker_id: str) -> WorkerSnapshot | None:
    try:
        workers = await router.workers()
    except Exception:  # noqa: BLE001 (Redis is coming back)
        return None
    return next((w for w in workers if w.worker_id == worker_id and w.alive), None)


async def test_a_worker_registers_reports_its_calls_drains_and_outlives_a_redis_outage(redis_server):
    prefix = "{pg-registration}"
    worker_id = f"worker-{uuid.uuid4().hex[:6]}"
    settings = {"redis_url": redis_server.url, "redis_prefix": prefix, "worker_id": worker_id,
                "heartbeat_seconds": "2", "worker_ttl_seconds": "6"}
    router = RedisRouter(redis_server.url, prefix=prefix)
    try:
        with own_worker(**settings) as (base, proc):
            async def alive(**wanted: object) -> WorkerSnapshot | None:
                snap = await _snapshot(router, worker_id)
                return snap if snap and all(getattr(snap, k) == v for k, v in wanted.items()) else None

            # Registered once ready, with its capacity and the URL gateways reach it at.
            snap = await until_async(alive, "the worker appears in the routing store", timeout=8)
            assert (snap.capacity, snap.free, snap.reserved, snap.draining) == (2, 2, 0, False)
            assert snap.url == f"ws://{base}/v1/sessions"

            # A session's id is reported as one of its calls: a claim for that call id finds it there.
            call = await TalkingSession.start(base, "call-registered")
            await until_async(lambda: alive(reserved=1), "the heartbeat reports the call", timeout=8)
            claim = await router.claim("call-registered", "tenant-a", None)
            assert claim.reused and claim.worker_id == worker_id

            # Redis goes away: the call keeps its audio and the worker stays ready.
            stopped = time.monotonic()
            redis_server.stop()
            await asyncio.sleep(3.0)
            assert proc.poll() is None
            async with httpx.AsyncClient(base_url=f"http://{base}", timeout=5) as http:
                assert (await http.get("/healthz")).status_code == 200
                assert (await http.get("/readyz")).status_code == 200
            gap = call.largest_gap(since=stopped)
            assert gap < 0.5, f"the call went {gap:.2f} s without agent audio while Redis was down"

            # Redis comes back empty: the next heartbeats register the worker and its call again.
            redis_server.start()
            snap = await until_async(lambda: alive(reserved=1),
                                     "the worker registers again after the restart", timeout=10)
            assert snap.capacity == 2 and not snap.draining
            claim = await router.claim("call-registered", "tenant-a", None)
            assert claim.reused and claim.worker_id == worker_id

            # SIGTERM: the store hears "draining" at once (not at the next 2 s heartbeat).
            signalled = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            await until_async(lambda: alive(draining=True), "the worker is draining in the store", timeout=5)
            assert time.monotonic() - signalled < 1.5
            with pytest.raises(Refusal) as refused:  # the only worker drains: no new call goes there
                await router.claim("call-new", "tenant-a", None)
            assert refused.value.reason == "no_capacity"

            assert await call.end() == (1000, "session ended: client_end")
            assert await exit_status(proc, 10.0) == 0
            # Its last heartbeat ended its lease: the store takes it for dead now, not after its 6 s TTL.
            assert await _snapshot(router, worker_id) is None
    finally:
        if not redis_server.running:
            redis_server.start()
        await router.close()
