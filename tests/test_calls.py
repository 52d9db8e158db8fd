"""The gateway's calls as a caller and an operator live them: audio through a worker, a worker killed
mid-call, Redis going away and coming back, tenant limits, drains, and the single-machine default.

Everything is real and on loopback: `personagate worker` processes (tiny model, greedy) registered in a
real redis-server (tests/redis_server.py) under a prefix of this module's own, and the gateway's `Calls`
in the test's event loop, driven the way a front end drives it (one 80 ms caller frame at a time, agent
frames read as they come). There is no front end yet to carry a call inside a `personagate gateway`
process, so the drain tests run the gateway's real server (`GracefulServer` + the app) in-process and hand
it the SIGTERM through the same handler uvicorn calls; a subprocess test checks the signal wiring itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import uvicorn

from gateway.app import create_app
from gateway.calls import COMFORT_NOISE, Calls, PersonaRejected, SessionState
from gateway.config import GatewaySettings
from gateway.metrics import GatewayMetrics
from gateway.tenants.registry import TenantRegistry
from gateway.tenants.tenant import PersonaConfig, Tenant
from gateway.worker_client import WorkerSession
from personagate_common.routing import RedisRouter, Refusal, Router, RoutingMetrics
from personagate_common.serving import GracefulServer
from tests.helpers.calls import ACME, TIGHT, Caller, alive, route, running
from tests.helpers.processes import free_port, serve, stop_process
from tests.helpers.redis_server import RedisServer
from tests.helpers.wait import until_async
from tests.helpers.worker import WORKER_AUTH, WORKER_AUTH_HEADERS

# ------------------------------------------------------------------------------------ set-up


@contextlib.contextmanager
def workers(n: int, *, redis: RedisServer | None = None, prefix: str = "", slots: int = 2, plain: int = 0
            ) -> Iterator[dict[str, tuple[int, subprocess.Popen]]]:
    """``n`` worker processes heartbeating to ``redis`` under ``prefix``, and ``plain`` ones registered nowhere
    (ids ``plain-…``), all started side by side. Yields worker id → (port, process)."""
    with contextlib.ExitStack() as stack:
        out = {}
        for i in range(n + plain):
            port = free_port()
            env = os.environ | {"NO_TORCH_COMPILE": "1"}
            worker_id = f"w{i}-{port}" if i < n else f"plain-{port}"
            if i < n and redis is not None:
                env |= {"PERSONAGATE_WORKER_REDIS_URL": redis.url, "PERSONAGATE_WORKER_REDIS_PREFIX": prefix,
                        "PERSONAGATE_WORKER_WORKER_ID": worker_id}
            command = [sys.executable, "-m", "personagate", "worker", "--port", str(port), "--slots", str(slots),
                       "--greedy"]
            log = stack.enter_context(tempfile.TemporaryFile())
            proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=log)
            stack.callback(stop_process, proc)
            out[worker_id] = (port, proc, log)
        deadline = time.monotonic() + 90
        for worker_id, (port, proc, log) in out.items():
            while not _ready(port):
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    raise RuntimeError(f"worker {worker_id} did not become ready: {log.read().decode()[-3000:]}")
                time.sleep(0.1)
        yield {worker_id: (port, proc) for worker_id, (port, proc, _) in out.items()}


def _ready(port: int) -> bool:
    with contextlib.suppress(httpx.HTTPError):
        return httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 200
    return False


@dataclass
class Fleet:
    redis: RedisServer
    prefix: str
    workers: dict[str, tuple[int, subprocess.Popen]]  # registered in Redis
    plain_port: int  # a worker registered nowhere: what a single-machine gateway polls


@pytest.fixture(scope="module")
def fleet(redis_server: RedisServer) -> Iterator[Fleet]:
    """Two workers registered in Redis and one that is not, for the whole module (the last test kills one)."""
    prefix = "{pg-calls-" + uuid.uuid4().hex[:8] + "}"
    with workers(2, redis=redis_server, prefix=prefix, plain=1) as procs:
        plain = next(w for w in procs if w.startswith("plain-"))
        yield Fleet(redis_server, prefix, {w: p for w, p in procs.items() if w != plain}, procs[plain][0])


def redis_calls(redis: RedisServer, prefix: str, registry: TenantRegistry) -> Calls:
    """The gateway's calls on Redis, with a short lease (renewed every second) and a quick reaper."""
    metrics = GatewayMetrics()
    router = RedisRouter(redis.url, prefix=prefix, lease_seconds=3.0, timeout=0.5, connect_timeout=0.3,
                         metrics=RoutingMetrics(metrics.registry))
    return Calls(router, registry, metrics=metrics, reap_seconds=0.25, worker_auth=WORKER_AUTH)


async def reserved(router: Router) -> dict[str, int]:
    return {w.worker_id: w.reserved for w in await router.workers() if w.alive}


# ------------------------------------------------------------------------------------ calls


async def test_a_call_streams_the_agents_audio_and_frees_its_slot_when_the_caller_hangs_up(fleet, registry):
    async with running(redis_calls(fleet.redis, fleet.prefix, registry), 2) as calls:
        call = await calls.start("call-stream", *route(registry, ACME))
        assert call.state is SessionState.LIVE and call.worker_id in fleet.workers
        assert (await reserved(calls.router))[call.worker_id] == 1
        caller = Caller(call)
        began = time.monotonic()
        await asyncio.sleep(1.2)
        assert caller.frames_since(began, filler=False) >= 10  # ~one agent frame per caller frame
        assert caller.frames_since(began, filler=True) == 0
        assert caller.largest_gap(began + 0.3) < 0.5
        assert await caller.hang_up() == "hangup"
        assert [state for state, _ in call.history] == ["claiming", "connecting", "live", "ending", "ended"]
        assert "call-stream" not in calls.live
        assert sum((await reserved(calls.router)).values()) == 0


async def test_redis_stopped_and_restarted_mid_call_keeps_the_audio_refuses_then_accepts_new_calls(
        fleet, registry, caplog):
    """Redis killed mid-call: the call's audio goes on, a new call is refused (unavailable) at once, the gateway
    stays ready with the store reported unreachable; Redis back: the call is re-asserted and new calls are taken."""
    caplog.set_level(logging.INFO, logger="gateway.calls")
    async with running(redis_calls(fleet.redis, fleet.prefix, registry), 2) as calls:
        call = await calls.start("call-outage", *route(registry, ACME))
        caller = Caller(call)
        await asyncio.sleep(0.6)
        down_at = time.monotonic()
        fleet.redis.stop(kill=True)
        try:
            await asyncio.sleep(0.5)
            asked = time.monotonic()
            refusal = await _refused(calls.start("call-during-outage", *route(registry, ACME)))
            assert refusal.reason == "unavailable" and time.monotonic() - asked < 1.5
            assert "call-during-outage" not in calls.live
            # Readiness holds (every gateway sees a Redis failover at once: none must leave its load balancer);
            # the store's state is in its details and new calls are refused meanwhile.
            await until_async(lambda: calls.readiness()[1]["routing_store"] == "unreachable",
                              "readiness reports the store unreachable while Redis is away", timeout=3)
            assert calls.readiness()[0] is True and "reason" not in calls.readiness()[1]
            await asyncio.sleep(1.5)  # past a lease renewal (every second here)
            # ~2 s of the outage: ~25 frames when quiet; what matters is that audio went on, without a gap
            assert caller.frames_since(down_at, filler=False) >= 15
            assert caller.largest_gap(down_at) < 0.5
        finally:
            fleet.redis.start()
        up_at = time.monotonic()
        # Workers re-register on their next heartbeat and the gateway re-asserts its call: no restart.
        await until_async(lambda: alive(calls.router, 2), "workers registered again", timeout=5)
        await until_async(lambda: _placed(calls.router, call.worker_id), "the call re-asserted in Redis", timeout=5)
        await until_async(lambda: calls.readiness()[1]["routing_store"] == "reachable", "the store reachable again",
                          timeout=3)
        second = await calls.start("call-after-outage", *route(registry, ACME))
        assert second.state is SessionState.LIVE
        await second.end()
        assert call.state is SessionState.LIVE and call.rehomes == []
        assert caller.largest_gap(up_at) < 0.5
        assert await caller.hang_up() == "hangup"
        said = [r.getMessage() for r in caplog.records if r.name == "gateway.calls"]
        assert sum(m.startswith("renewing call leases failed") for m in said) == 1, said  # once per outage
        assert sum(m.startswith("routing store reachable again") for m in said) == 1, said


async def _placed(router: Router, worker_id: str | None) -> bool:
    return (await reserved(router)).get(worker_id or "", 0) >= 1


async def _refused(start) -> Refusal:
    with pytest.raises(Refusal) as info:
        await start
    return info.value


async def test_a_tenant_at_its_limit_is_refused_with_tenant_limit_until_a_call_ends(fleet, registry):
    async with running(redis_calls(fleet.redis, fleet.prefix, registry), 2) as calls:
        first = await calls.start("tight-1", *route(registry, TIGHT))
        refusal = await _refused(calls.start("tight-2", *route(registry, TIGHT)))
        assert refusal.reason == "tenant_limit" and "tight" in refusal.detail
        other = await calls.start("acme-1", *route(registry, ACME))  # other tenants are not held back
        await first.end()
        again = await calls.start("tight-3", *route(registry, TIGHT))
        await asyncio.gather(other.end(), again.end())
        assert calls.metrics.registry.get_sample_value(
            "personagate_gateway_call_starts_total", {"result": "tenant_limit"}) == 1


async def test_a_persona_the_worker_refuses_is_a_clear_error_and_takes_no_slot(fleet, registry):
    tenant, persona = route(registry, ACME)
    broken = persona.__class__(tenant.id, "broken", "x" * 5000, "NATF0", None, persona.sampling, False)
    async with running(redis_calls(fleet.redis, fleet.prefix, registry), 2) as calls:
        with pytest.raises(PersonaRejected) as info:
            await calls.start("call-broken", tenant, broken)
        assert "acme/broken" in str(info.value) and "prompt" in info.value.reason
        assert sum((await reserved(calls.router)).values()) == 0


# ------------------------------------------------------------------------------------ drain


@contextlib.asynccontextmanager
async def gateway_server(settings: GatewaySettings, calls: Calls) -> AsyncIterator[tuple[GracefulServer, str]]:
    """The gateway as `personagate gateway` runs it (app + GracefulServer), in this event loop."""
    app = create_app(settings, calls=calls)
    config = uvicorn.Config(app, host="127.0.0.1", port=settings.http_port, log_config=None)
    server = GracefulServer(config, drain=lambda: calls.drain(settings.drain_seconds), stop=calls.stop)
    serving = asyncio.create_task(server.serve())
    base = f"http://127.0.0.1:{settings.http_port}"
    try:
        await until_async(lambda: server.started, "the gateway serving", timeout=10)
        yield server, base
        await asyncio.wait_for(serving, 15)
    finally:
        server.should_exit = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(serving, 10)


async def test_sigterm_on_the_gateway_refuses_new_calls_fails_readiness_and_lets_the_live_call_finish(
        fleet, registry):
    settings = GatewaySettings(tenants_dir=registry.root, http_port=free_port(), drain_seconds=30)
    calls = redis_calls(fleet.redis, fleet.prefix, registry)
    async with gateway_server(settings, calls) as (server, base), httpx.AsyncClient(base_url=base) as http:
        await until_async(lambda: alive(calls.router, 2), "workers registered", timeout=10)
        assert (await http.get("/readyz")).status_code == 200
        call = await calls.start("call-drain", *route(registry, ACME))
        caller = Caller(call)
        server.on_signal(signal.SIGTERM)  # what uvicorn's handler hands over on SIGTERM
        await until_async(lambda: calls.draining, "draining", timeout=2)
        ready = await http.get("/readyz")
        assert ready.status_code == 503 and ready.json()["reason"] == "draining"
        assert (await http.get("/healthz")).status_code == 200  # liveness holds
        refusal = await _refused(calls.start("call-too-late", *route(registry, ACME)))
        assert refusal.reason == "draining"
        began = time.monotonic()
        await asyncio.sleep(1.0)
        assert caller.frames_since(began, filler=False) >= 8 and caller.largest_gap(began) < 0.5
        assert not server.should_exit
        assert await caller.hang_up() == "hangup"  # the last call ends: the gateway exits
        await until_async(lambda: server.should_exit, "the gateway exits once its calls have ended", timeout=3)


async def test_a_call_still_live_at_the_drain_deadline_is_ended_with_shutdown(fleet, registry):
    settings = GatewaySettings(tenants_dir=registry.root, http_port=free_port(), drain_seconds=1.0)
    calls = redis_calls(fleet.redis, fleet.prefix, registry)
    async with gateway_server(settings, calls) as (server, _):
        await until_async(lambda: alive(calls.router, 2), "workers registered", timeout=10)
        call = await calls.start("call-straggler", *route(registry, ACME))
        caller = Caller(call)
        signalled = time.monotonic()
        server.on_signal(signal.SIGTERM)
        assert await asyncio.wait_for(call.wait_ended(), 5) == "shutdown"
        assert 0.9 < time.monotonic() - signalled < 4
        await caller.stop()
        await until_async(lambda: server.should_exit, "the gateway exits", timeout=3)
        assert sum((await _reserved_in(fleet)).values()) == 0


async def _reserved_in(fleet: Fleet) -> dict[str, int]:
    router = RedisRouter(fleet.redis.url, prefix=fleet.prefix)
    try:
        return await reserved(router)
    finally:
        await router.close()


def test_sigterm_stops_an_idle_personagate_gateway_process_cleanly(registry, fleet):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PERSONAGATE_GATEWAY_")}
    command = [sys.executable, "-m", "personagate", "gateway", "--tenants", str(registry.root), "--port", str(port),
               "--redis-url", fleet.redis.url]
    with serve(command, f"http://127.0.0.1:{port}/readyz", env=env, timeout=30) as proc:
        ready = httpx.get(f"http://127.0.0.1:{port}/readyz").json()
        assert ready["ready"] is True and ready["calls"] == 0
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics").text  # one registry: routing and calls too
        assert "personagate_routing_claims_total" in metrics and "personagate_gateway_calls_active" in metrics
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0


# ------------------------------------------------------------------------------------ one machine


async def test_without_redis_the_gateway_polls_its_worker_and_serves_a_call_like_personagate_up(fleet, registry):
    port = fleet.plain_port
    settings = GatewaySettings(tenants_dir=Path(registry.root), workers=[f"http://127.0.0.1:{port}"])
    calls = Calls.from_settings(settings, registry)
    assert calls.workers == (f"http://127.0.0.1:{port}",)
    async with running(calls, 1):
        call = await calls.start("call-embedded", *route(registry, ACME))
        caller = Caller(call)
        await asyncio.sleep(1.0)
        async with httpx.AsyncClient(headers=WORKER_AUTH_HEADERS) as http:
            info = (await http.get(f"http://127.0.0.1:{port}/v1/info")).json()
        assert "call-embedded" in info["active_sessions"]
        assert caller.frames_since(time.monotonic() - 0.8, filler=False) >= 6
        assert await caller.hang_up() == "hangup"
        await until_async(lambda: _free(calls.router), "the slot free", timeout=3)
        assert calls.metrics.registry.get_sample_value("personagate_routing_claims_total", {"result": "claimed"}) == 1


async def _free(router: Router) -> bool:
    return sum((await reserved(router)).values()) == 0


# ------------------------------------------------------------------------------------ worker death


async def test_killing_the_callers_worker_moves_the_call_within_1s_with_comfort_noise_not_silence(fleet, registry):
    """Runs after the others but one: it kills one of the module's workers."""
    procs = fleet.workers
    async with running(redis_calls(fleet.redis, fleet.prefix, registry), 2) as calls:
        router = calls.router
        # A tenant's persona is primed on every worker that has served it; priming one afresh is the
        # worker's cost (docs/benchmarks.md), not the gateway's, so both workers have it here.
        await warm(calls, procs, *route(registry, ACME))
        call = await calls.start("call-kill", *route(registry, ACME))
        first = call.worker_id
        caller = Caller(call)
        await asyncio.sleep(1.0)
        killed_at = time.monotonic()
        procs[first][1].kill()  # SIGKILL: no close frame, no drain, no last heartbeat
        await until_async(lambda: call.rehomes, "the call re-homed", timeout=3)
        await asyncio.sleep(1.5)

        (move,) = call.rehomes
        second = next(w for w in procs if w != first)
        assert (move.from_worker, move.to_worker) == (first, second)
        assert move.seconds < 1.0 and move.persona_cached, move
        assert call.state is SessionState.LIVE and call.worker_id == second
        # The caller never heard dead air: comfort noise, then the new worker's agent.
        assert caller.largest_gap(killed_at - 0.5) < 1.0
        after = [(f, w) for t, f, w in caller.audio if t >= killed_at]
        assert any(f for f, _ in after), "no comfort noise while re-homing"
        first_filler = next(i for i, (f, _) in enumerate(after) if f)
        assert any(not f and w == second for f, w in after[first_filler:]), "no agent audio from the new worker"
        assert caller.frames_since(time.monotonic() - 1.0, filler=False) >= 8
        fill = [np.frombuffer(pcm, "<i2") for pcm in COMFORT_NOISE]
        rms = np.sqrt(np.mean(np.concatenate(fill).astype(np.float64) ** 2)) / 32768
        assert -42 < 20 * np.log10(rms) < -38  # soft: about -40 dBFS

        # The dead worker's registration and slot are reaped once its heartbeat deadline passes.
        await until_async(lambda: _gone(router, first), "the dead worker reaped", timeout=8)
        placed = await router.client.hgetall(f"{fleet.prefix}:call:worker")
        assert (await reserved(router)) == {second: 1}, placed
        assert calls.metrics.registry.get_sample_value("personagate_routing_calls_rehomed_total") == 1
        assert await caller.hang_up() == "hangup"
        assert (await reserved(router)) == {second: 0}


async def test_a_hung_worker_is_given_up_at_its_heartbeat_deadline_and_with_no_other_the_call_ends_no_worker(
        fleet, registry):
    """Runs last, after the kill: one worker is left, and this test freezes it (SIGSTOP): its socket stays
    open, so only the reaper can tell; the call's worker does not answer a ping either, so the call is
    given up, and with no other worker it ends with no_worker (a front end plays its apology)."""
    (worker_id, (_, proc)), = [(w, p) for w, p in fleet.workers.items() if p[1].poll() is None]
    async with running(redis_calls(fleet.redis, fleet.prefix, registry), 1) as calls:
        call = await calls.start("call-hung", *route(registry, ACME))
        assert call.worker_id == worker_id
        caller = Caller(call)
        await asyncio.sleep(0.5)
        frozen_at = time.monotonic()
        proc.send_signal(signal.SIGSTOP)
        try:
            assert await asyncio.wait_for(call.wait_ended(), 10) == "no_worker"
            ended_after = time.monotonic() - frozen_at
        finally:
            proc.send_signal(signal.SIGCONT)
        await caller.stop()  # frames() ended with the call
        assert 2.5 < ended_after < 6  # the worker's 3 s heartbeat deadline, the reaper, a 0.5 s ping
        assert "call-hung" not in calls.live
        assert call.history[-3:][0][0] is SessionState.REHOMING


async def warm(calls: Calls, procs: dict[str, object], tenant: Tenant, persona: PersonaConfig) -> None:
    """Prime ``persona`` on each worker: a claimed session on each in turn, ended at once."""
    for worker_id in procs:
        others = [w for w in procs if w != worker_id]
        claim = await calls.router.claim(f"warm-{worker_id}", tenant.id, None, exclude_workers=others)
        assert claim.worker_id == worker_id
        session = await WorkerSession.open(claim.url, persona.worker_persona, session_id=claim.call_id,
                                           auth=WORKER_AUTH)
        await session.end()
        await session.close()
        await calls.router.release(claim.call_id)


async def _gone(router: Router, worker_id: str) -> bool:
    return worker_id not in {w.worker_id for w in await router.workers()}
