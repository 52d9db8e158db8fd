"""Routing: slots and tenant limits never over-committed, worker death, drain, Redis outage and recovery.

The Redis store runs against a real redis-server (tests/redis_server.py); behaviour that belongs to the
store is checked on both stores. Every Redis test uses its own hash-tag prefix, so tests do not see each
other's keys.
"""

from __future__ import annotations

import asyncio
import collections
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot

from personagate_bench import routing as bench
from personagate_common.routing import (
    Claim,
    EmbeddedRouter,
    RedisRouter,
    Refusal,
    Router,
    RoutingMetrics,
    SentinelSettings,
    WorkerState,
    make_router,
    parse_sentinel_url,
)
from personagate_common.routing.scripts import KEY_NAMES
from tests.helpers.processes import free_port
from tests.helpers.redis_server import RedisServer, redis_executable

STORES = [pytest.param("redis", marks=pytest.mark.e2e), "embedded"]  # redis: a redis-server process
MakeRouter = Callable[..., Router]


@pytest.fixture(params=STORES)
async def make(request: pytest.FixtureRequest) -> AsyncIterator[MakeRouter]:
    """Makes routers on one store. On Redis, every router of a test shares a fresh prefix (as gateways
    share one Redis); on the embedded store, asking again gives the same router (it is one process)."""
    routers: list[Router] = []
    prefix = "{pg-" + uuid.uuid4().hex[:8] + "}"
    url = request.getfixturevalue("redis_server").url if request.param == "redis" else None

    def factory(**options: object) -> Router:
        if url is None and routers:
            return routers[0]
        router: Router = (
            RedisRouter(url, prefix=prefix, **options) if url else EmbeddedRouter(**options)  # type: ignore[arg-type]
        )
        routers.append(router)
        return router

    factory.store = request.param  # type: ignore[attr-defined]
    yield factory
    for router in routers:
        await router.close()


def worker(n: int, capacity: int = 4, **kw: object) -> WorkerState:
    return WorkerState(f"w{n}", f"ws://10.0.0.{n}:8765/v1/sessions", capacity, **kw)  # type: ignore[arg-type]


async def refusal_of(coro: Awaitable[object]) -> Refusal:
    with pytest.raises(Refusal) as info:
        await coro
    return info.value


async def by_worker(router: Router) -> dict[str, tuple[int, int]]:
    return {w.worker_id: (w.reserved, w.free) for w in await router.workers()}


# -- the races ---------------------------------------------------------------------------------------


async def test_200_concurrent_claims_on_3_workers_of_4_slots_give_exactly_12_four_per_worker(make: MakeRouter):
    # Redis: four gateways (own routers, own connection pools) race on one store
    gateways = [make() for _ in range(4)]
    for n in range(3):
        await gateways[0].heartbeat(worker(n))

    async def attempt(i: int) -> Claim | Refusal:
        try:
            return await gateways[i % 4].claim(f"call-{i}", f"tenant-{i % 7}", tenant_limit=None)
        except Refusal as refusal:
            return refusal

    results = await asyncio.gather(*(attempt(i) for i in range(200)))
    claims = [r for r in results if isinstance(r, Claim)]
    refusals = [r for r in results if isinstance(r, Refusal)]
    assert len(claims) == 12
    assert collections.Counter(c.worker_id for c in claims) == {"w0": 4, "w1": 4, "w2": 4}
    assert len(refusals) == 188 and {r.reason for r in refusals} == {"no_capacity"}
    assert all(r.retry_after_seconds > 0 for r in refusals)
    assert await by_worker(gateways[0]) == {"w0": (4, 0), "w1": (4, 0), "w2": (4, 0)}


async def test_tenant_limit_holds_when_50_claims_race_with_plenty_of_slots(make: MakeRouter):
    gateways = [make() for _ in range(3)]
    for n in range(3):
        await gateways[0].heartbeat(worker(n, capacity=40))

    async def attempt(i: int) -> Claim | Refusal:
        try:
            return await gateways[i % 3].claim(f"call-{i}", "acme", tenant_limit=5)
        except Refusal as refusal:
            return refusal

    results = await asyncio.gather(*(attempt(i) for i in range(50)))
    claims = [r for r in results if isinstance(r, Claim)]
    assert len(claims) == 5
    assert {r.reason for r in results if isinstance(r, Refusal)} == {"tenant_limit"}
    # the limit is per tenant: another tenant still gets in; a released call frees one place
    await gateways[0].claim("other-1", "globex", tenant_limit=5)
    assert (await refusal_of(gateways[1].claim("call-x", "acme", tenant_limit=5))).reason == "tenant_limit"
    await gateways[2].release(claims[0].call_id)
    assert (await gateways[1].claim("call-x", "acme", tenant_limit=5)).tenant == "acme"
    assert sum(w.reserved for w in await gateways[0].workers()) == 6


# -- claims --------------------------------------------------------------------------------------------


async def test_a_retried_claim_returns_the_same_worker_without_a_second_slot_or_tenant_count(make: MakeRouter):
    router = make()
    await router.heartbeat(worker(1, capacity=2))
    await router.heartbeat(worker(2, capacity=2))
    first = await router.claim("call-1", "acme", tenant_limit=1)
    assert not first.reused and first.tenant == "acme"
    again = await make().claim("call-1", "acme", tenant_limit=1)  # another gateway retries
    assert again.reused and again.worker_id == first.worker_id and again.url == first.url
    assert sum(r for r, _ in (await by_worker(router)).values()) == 1
    # a retry that excludes the worker (it refused the session) moves the call; still one slot, one count
    moved = await router.claim("call-1", "acme", tenant_limit=1, exclude_workers=[first.worker_id])
    assert not moved.reused and moved.worker_id != first.worker_id
    assert await by_worker(router) == {first.worker_id: (0, 2), moved.worker_id: (1, 1)}
    assert (await refusal_of(router.claim("call-2", "acme", tenant_limit=1))).reason == "tenant_limit"


async def test_persona_cached_workers_are_preferred_then_the_least_loaded(make: MakeRouter):
    router = make()
    await router.heartbeat(worker(1, capacity=8))
    await router.heartbeat(worker(2, capacity=2, cached_personas=("acme/support",)))
    await router.heartbeat(worker(3, capacity=4, cached_personas=("acme/support", "acme/sales")))
    # the persona: cached workers only, the one with more free slots first, even over a freer uncached one
    a = await router.claim("a", "acme", None, persona_key="acme/support")
    assert (a.worker_id, a.persona_cached) == ("w3", True)
    b = await router.claim("b", "acme", None, persona_key="acme/support")
    c = await router.claim("c", "acme", None, persona_key="acme/support")
    assert {b.worker_id, c.worker_id} == {"w2", "w3"}  # w3 3 free, then 2 and 2: both cached ones in turn
    # no persona, or one nobody has: the most free slots
    d = await router.claim("d", "acme", None)
    assert (d.worker_id, d.persona_cached) == ("w1", False)
    e = await router.claim("e", "acme", None, persona_key="globex/claims")
    assert (e.worker_id, e.persona_cached) == ("w1", False)
    # cached workers full: the least loaded of the rest
    for call in ("f", "g", "h"):
        await router.claim(call, "acme", None, persona_key="acme/support")
    assert await by_worker(router) == {"w1": (2, 6), "w2": (2, 0), "w3": (4, 0)}
    late = await router.claim("i", "acme", None, persona_key="acme/support")
    assert (late.worker_id, late.persona_cached) == ("w1", False)
    # a worker that stops caching a persona loses the preference at its next heartbeat
    await router.release("a")
    await router.heartbeat(worker(3, capacity=4, cached_personas=("acme/sales",)))
    j = await router.claim("j", "acme", None, persona_key="acme/support")
    assert (j.worker_id, j.persona_cached) == ("w1", False)


async def test_release_frees_the_slot_and_the_tenant_count_once(make: MakeRouter):
    router = make()
    await router.heartbeat(worker(1, capacity=1))
    await router.claim("call-1", "acme", tenant_limit=1)
    assert (await refusal_of(router.claim("call-2", "globex", None))).reason == "no_capacity"
    assert await router.release("call-1") is True
    assert await router.release("call-1") is False
    assert await by_worker(router) == {"w1": (0, 1)}
    assert (await router.claim("call-2", "acme", tenant_limit=1)).worker_id == "w1"


# -- drain, death, leases ------------------------------------------------------------------------------


async def test_draining_workers_get_no_claims_and_keep_their_calls(make: MakeRouter):
    router = make()
    await router.heartbeat(worker(1))
    on_w1 = [await router.claim(f"c{i}", "acme", None) for i in range(2)]
    await router.heartbeat(worker(2))
    assert await router.drain("w1") is True and await router.drain("nobody") is False
    for i in range(2, 6):
        assert (await router.claim(f"c{i}", "acme", None)).worker_id == "w2"
    assert (await refusal_of(router.claim("c6", "acme", None))).reason == "no_capacity"
    # the worker's own heartbeat (not draining by its flag) does not undo a drain
    await router.heartbeat(worker(1, active_calls=("c0", "c1")))
    assert (await refusal_of(router.claim("c6", "acme", None))).reason == "no_capacity"
    snapshot = {w.worker_id: w for w in await router.workers()}
    assert snapshot["w1"].draining and snapshot["w1"].alive
    # a worker that announces its own drain (SIGTERM) is out at once too
    await router.heartbeat(worker(3, draining=True))
    assert (await refusal_of(router.claim("c6", "acme", None))).reason == "no_capacity"
    # its calls finish normally
    for c in on_w1:
        await router.release(c.call_id)
    assert (await by_worker(router))["w1"] == (0, 4)


async def test_a_drained_worker_restarted_under_the_same_id_takes_calls_again(make: MakeRouter):
    """A worker that said farewell while draining (deadline already passed) and comes back before any
    reaper ran is not stuck draining for good."""
    router = make()
    await router.heartbeat(worker(1, draining=True), ttl_seconds=0.001)  # the farewell heartbeat
    await asyncio.sleep(0.01)
    await router.heartbeat(worker(1))  # the restarted worker, same id
    assert (await router.claim("c0", "acme", None)).worker_id == "w1"


async def test_a_worker_whose_heartbeat_stops_is_reaped_after_its_ttl_with_its_reservations(make: MakeRouter):
    metrics = RoutingMetrics()
    router = make(metrics=metrics)
    await router.heartbeat(worker(1, capacity=2), ttl_seconds=0.4)
    await router.heartbeat(worker(2, capacity=2), ttl_seconds=30)
    claims = [await router.claim(f"c{i}", "acme", tenant_limit=4) for i in range(4)]
    on_w1 = sorted(c.call_id for c in claims if c.worker_id == "w1")
    assert len(on_w1) == 2
    assert (await router.reap()).dead_workers == ()
    await asyncio.sleep(0.5)
    # past its deadline it takes no claims even before the reaper runs
    assert (await refusal_of(router.claim("c9", "globex", None))).reason == "no_capacity"
    reaped = await router.reap()
    assert reaped.dead_workers == ("w1",) and sorted(reaped.orphaned_calls) == on_w1
    assert [w.worker_id for w in await router.workers()] == ["w2"]
    assert metrics.workers_reaped._value.get() == 1
    # its calls stay counted for the tenant until the gateway re-homes or releases them
    assert (await refusal_of(router.claim("c9", "acme", tenant_limit=4))).reason == "tenant_limit"
    for call in on_w1:
        await router.release(call)
    await router.release(next(c.call_id for c in claims if c.worker_id == "w2"))
    assert (await router.claim("c9", "acme", tenant_limit=4)).worker_id == "w2"
    # it comes back with a new heartbeat: a fresh worker with no reservations
    await router.heartbeat(worker(1, capacity=2))
    assert (await by_worker(router))["w1"] == (0, 2)


async def test_a_call_whose_gateway_stopped_renewing_is_released_by_the_reaper(make: MakeRouter):
    router = make(lease_seconds=0.8)
    await router.heartbeat(worker(1, capacity=4), ttl_seconds=30)
    kept = await router.claim("kept", "acme", tenant_limit=2)
    await router.claim("dropped", "acme", tenant_limit=2)
    await asyncio.sleep(0.4)
    assert await router.renew([kept]) == ()
    await asyncio.sleep(0.5)  # "dropped" is past its lease, "kept" is not
    reaped = await router.reap()
    assert reaped.expired_calls == ("dropped",) and reaped.dead_workers == ()
    assert await by_worker(router) == {"w1": (1, 3)}
    await router.claim("new", "acme", tenant_limit=2)  # the tenant count went down too
    # the worker still reporting the released call (its heartbeat raced the release) does not resurrect it
    result = await router.heartbeat(worker(1, capacity=4, active_calls=("kept", "dropped", "new")))
    assert result.recovered == () and result.reserved == 2


async def test_rehome_moves_a_call_off_a_dead_worker_keeping_the_tenant_count_and_freeing_nothing_twice(
    make: MakeRouter,
):
    metrics = RoutingMetrics()
    router = make(metrics=metrics)
    await router.heartbeat(worker(1, capacity=2, cached_personas=("p",)))
    await router.heartbeat(worker(2, capacity=2))
    await router.heartbeat(worker(3, capacity=2, cached_personas=("p",)))
    call = await router.claim("call-1", "acme", tenant_limit=2, persona_key="p")
    other = await router.claim("call-2", "acme", tenant_limit=2, persona_key="p")
    assert {call.worker_id, other.worker_id} == {"w1", "w3"}
    dead = call.worker_id
    moved = await router.rehome("call-1", dead, persona_key="p")
    # the persona-cached survivor is preferred; the dead one takes no claims until it heartbeats again
    assert moved.worker_id == other.worker_id and moved.persona_cached and not moved.reused
    assert moved.tenant == "acme"
    assert metrics.calls_rehomed._value.get() == 1
    again = await router.rehome("call-1", dead, persona_key="p")  # a retried rehome
    assert again.reused and again.worker_id == moved.worker_id
    assert metrics.calls_rehomed._value.get() == 1
    counts = await by_worker(router)
    assert counts[dead] == (0, 2) and counts[moved.worker_id] == (2, 0) and sum(r for r, _ in counts.values()) == 2
    assert (await router.claim("call-3", "globex", None)).worker_id == "w2"  # not the dead one
    # the tenant still has two calls: at its limit
    assert (await refusal_of(router.claim("call-4", "acme", tenant_limit=2))).reason == "tenant_limit"
    await router.release("call-1")
    await router.release("call-2")
    await router.release("call-3")
    assert all(r == 0 for r, _ in (await by_worker(router)).values())
    assert (await router.claim("call-4", "acme", tenant_limit=2)).tenant == "acme"


async def test_rehome_with_no_other_free_worker_is_refused_and_the_call_stays_counted(make: MakeRouter):
    router = make()
    await router.heartbeat(worker(1, capacity=1))
    await router.heartbeat(worker(2, capacity=1))
    await router.claim("a", "acme", tenant_limit=2)
    await router.claim("b", "acme", tenant_limit=2)
    refusal = await refusal_of(router.rehome("a", (await router.claim("a", "acme", 2)).worker_id))
    assert refusal.reason == "no_capacity"
    assert (await refusal_of(router.claim("c", "acme", tenant_limit=2))).reason == "tenant_limit"
    assert await router.release("a") and await router.release("b")


async def test_worker_state_and_ids_are_validated(make: MakeRouter):
    router = make()
    with pytest.raises(ValueError):
        await router.heartbeat(WorkerState("w\x001", "ws://x", 1))
    with pytest.raises(ValueError):
        await router.heartbeat(WorkerState("w1", "ws://x", -1))
    with pytest.raises(ValueError):
        await router.claim("", "acme", None)
    with pytest.raises(ValueError):
        await router.claim("c\n1", "acme", None)


async def test_claim_metrics_count_each_result(make: MakeRouter):
    metrics = RoutingMetrics()
    router = make(metrics=metrics)
    await router.heartbeat(worker(1, capacity=1, cached_personas=("p",)))
    await router.claim("a", "acme", 1)
    await router.claim("a", "acme", 1)
    for call, tenant in (("b", "acme"), ("c", "globex")):
        with pytest.raises(Refusal):
            await router.claim(call, tenant, 1)
    await router.workers()
    text = generate_latest(metrics.registry).decode()
    for result, n in (("claimed", 1), ("reused", 1), ("tenant_limit", 1), ("no_capacity", 1), ("unavailable", 0)):
        assert f'personagate_routing_claims_total{{result="{result}"}} {n}.0' in text
    assert "personagate_routing_claim_seconds_count 4.0" in text
    assert "personagate_routing_workers_alive 1.0" in text
    assert "personagate_routing_slots_total 1.0" in text
    assert "personagate_routing_slots_free 0.0" in text


# -- Redis only: layout, outage, restart, Sentinel, Cluster ----------------------------------------------


async def test_every_redis_key_shares_the_prefix_hash_tag(redis_server: RedisServer):
    prefix = "{pg-" + uuid.uuid4().hex[:8] + "}"
    async with RedisRouter(redis_server.url, prefix=prefix) as router:
        await router.heartbeat(worker(1, cached_personas=("p",)))
        await router.claim("a", "acme", None, persona_key="p")
        await router.drain("w1")
        await router.release("a")
        client = Redis.from_url(redis_server.url, decode_responses=True)
        keys = set(await client.keys(prefix + "*"))
        assert keys and keys <= {f"{prefix}:{name}" for name in KEY_NAMES}
        assert len({key_slot(key.encode()) for key in keys}) == 1
        await client.aclose()
    with pytest.raises(ValueError):
        RedisRouter(redis_server.url, prefix="pg")


async def test_redis_stopped_refuses_every_call_as_unavailable_within_a_second(redis_server: RedisServer):
    metrics = RoutingMetrics()
    prefix = "{pg-" + uuid.uuid4().hex[:8] + "}"
    router = RedisRouter(redis_server.url, prefix=prefix, metrics=metrics)
    try:
        await router.heartbeat(worker(1))
        live = await router.claim("live", "acme", None)
        redis_server.stop(kill=True)
        try:
            started = time.monotonic()
            refusal = await refusal_of(router.claim("new", "acme", None))
            assert refusal.reason == "unavailable" and time.monotonic() - started < 1.0
            assert "cannot be reached" in refusal.detail
            for call in (router.heartbeat(worker(1)), router.renew([live]), router.release("live"),
                         router.rehome("live", "w1"), router.drain("w1"), router.workers(), router.reap()):
                started = time.monotonic()
                assert (await refusal_of(call)).reason == "unavailable"
                assert time.monotonic() - started < 1.0
        finally:
            redis_server.start()
        assert 'personagate_routing_claims_total{result="unavailable"} 1.0' in generate_latest(
            metrics.registry).decode()
        # back, empty: the same router works again without a restart (fresh connections, scripts re-loaded)
        assert (await refusal_of(router.claim("new", "acme", None))).reason == "no_capacity"
    finally:
        await router.close()


async def test_a_redis_that_accepts_but_never_answers_is_refused_within_the_timeout():
    with socket.socket() as listener:  # the kernel completes connections; nobody ever answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        port = listener.getsockname()[1]
        router = RedisRouter(f"redis://127.0.0.1:{port}", timeout=0.5)
        try:
            started = time.monotonic()
            refusal = await refusal_of(router.claim("a", "acme", None))
            assert refusal.reason == "unavailable" and time.monotonic() - started < 1.0
        finally:
            await router.close()


async def test_redis_restarted_empty_is_rebuilt_by_one_heartbeat_and_one_renew(redis_server: RedisServer):
    prefix = "{pg-" + uuid.uuid4().hex[:8] + "}"
    gateway = RedisRouter(redis_server.url, prefix=prefix)
    try:
        await gateway.heartbeat(worker(1, capacity=4))
        await gateway.heartbeat(worker(2, capacity=3))
        claims = {c.call_id: c for c in [await gateway.claim(f"c{i}", "acme", tenant_limit=4) for i in range(4)]}
        claims["g1"] = await gateway.claim("g1", "globex", tenant_limit=4)
        assert sum(w.reserved for w in await gateway.workers()) == 5
        # each worker is serving its calls except one the gateway has not connected yet ("c3")
        serving = {w: tuple(c for c in claims if claims[c].worker_id == w and c != "c3") for w in ("w1", "w2")}

        redis_server.stop(kill=True)
        redis_server.start()  # empty: nothing was saved

        # workers re-assert on their next heartbeat: calls they serve are reserved again (tenant unknown yet)
        recovered = set()
        for n, cap in ((1, 4), (2, 3)):
            result = await gateway.heartbeat(worker(n, capacity=cap, active_calls=serving[f"w{n}"]))
            recovered |= set(result.recovered)
        assert recovered == set(claims) - {"c3"}
        # the gateway re-asserts on its next renew: call -> worker and call -> tenant, "c3" included
        assert await gateway.renew(claims.values()) == ()
        expected = collections.Counter(c.worker_id for c in claims.values())
        assert {w.worker_id: w.reserved for w in await gateway.workers()} == expected
        assert (await refusal_of(gateway.claim("c9", "acme", tenant_limit=4))).reason == "tenant_limit"
        assert sum(w.free for w in await gateway.workers()) == 2  # 7 slots, 5 calls in progress
        new = [await gateway.claim(f"n{i}", "initech", None) for i in range(2)]
        assert (await refusal_of(gateway.claim("n9", "initech", None))).reason == "no_capacity"
        # and the books balance as calls end
        for call in [*claims, *(c.call_id for c in new)]:
            assert await gateway.release(call)
        assert all(w.reserved == 0 for w in await gateway.workers())
        assert (await gateway.claim("c9", "acme", tenant_limit=4)).tenant == "acme"
    finally:
        await gateway.close()


def test_sentinel_urls_parse_into_settings():
    s = parse_sentinel_url("redis+sentinel://:secret@s1:26379,s2:26380/mymaster/2?sentinel_password=sp")
    assert s == SentinelSettings(
        sentinels=(("s1", 26379), ("s2", 26380)), service="mymaster", db=2, password="secret",
        sentinel_password="sp",
    )
    assert parse_sentinel_url("rediss+sentinel://u:p@[::1]:26379/m").ssl
    for bad in ("redis://h:1/m", "redis+sentinel://h:1", "redis+sentinel://h/m", "redis+sentinel://h:1/m/x"):
        with pytest.raises(ValueError):
            parse_sentinel_url(bad)
    assert isinstance(make_router(None), EmbeddedRouter)


async def test_routing_through_a_real_sentinel(redis_server: RedisServer, tmp_path: Path):
    port = free_port()
    sentinel = RedisServer(
        redis_executable(), tmp_path, port=port, args=("--sentinel",),
        config=f"sentinel monitor pgmaster 127.0.0.1 {redis_server.port} 1\n",
    )
    sentinel.start()
    try:
        prefix = "{pg-" + uuid.uuid4().hex[:8] + "}"
        async with make_router(f"redis+sentinel://127.0.0.1:{port}/pgmaster", prefix=prefix) as router:
            await router.heartbeat(worker(1, capacity=1))
            assert (await router.claim("a", "acme", None)).worker_id == "w1"
            assert (await refusal_of(router.claim("b", "acme", None))).reason == "no_capacity"
    finally:
        sentinel.stop()


@pytest.mark.e2e  # starts a process
async def test_the_scripts_run_on_redis_cluster(tmp_path: Path):
    port = free_port()
    while port + 10000 > 65535:  # a cluster node also listens on port + 10000 (its bus)
        port = free_port()
    node = RedisServer(redis_executable(), tmp_path, port=port, args=(
        "--cluster-enabled", "yes", "--cluster-config-file", str(tmp_path / "nodes.conf"),
    ))
    node.start()
    try:
        admin = Redis(port=node.port)
        await admin.execute_command("CLUSTER", "ADDSLOTSRANGE", 0, 16383)
        deadline = time.monotonic() + 10
        while b"cluster_state:ok" not in await admin.execute_command("CLUSTER", "INFO"):
            assert time.monotonic() < deadline, "single-node cluster did not come up"
            await asyncio.sleep(0.05)
        await admin.aclose()
        cluster = RedisCluster(host="127.0.0.1", port=node.port, decode_responses=True)
        router = RedisRouter(cluster, prefix="{pg}")
        await router.heartbeat(worker(1, capacity=2, cached_personas=("p",)))
        claim = await router.claim("a", "acme", 2, persona_key="p")
        assert claim.persona_cached and (await router.workers())[0].reserved == 1
        assert await router.release("a")
        await router.reap()
        await router.close()  # not ours: the client stays open
        await cluster.aclose()
    finally:
        node.stop()


async def test_the_benchmark_reports_claims_per_second_and_latencies_for_both_stores(redis_server: RedisServer):
    result = await bench.run(redis_server.url, workers=2, slots=4, claims=300, concurrency=8)
    for store in ("redis", "embedded"):
        figures = result[store]
        assert figures["cycles"] == 300 and figures["refused"] == 0
        assert figures["claims_per_second"] > 0 and 0 < figures["claim_p50_ms"] <= figures["claim_p99_ms"]
    assert result["redis"]["server_us_per_script"] > 0
    client = Redis.from_url(redis_server.url)
    assert await client.keys("{pg-bench-*") == []  # it cleans up after itself
    await client.aclose()
