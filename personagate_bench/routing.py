"""Routing benchmark: claim + release cycles against a real Redis and against the embedded store.

    python -m personagate_bench.routing --redis-url redis://127.0.0.1:6379/0 --workers 4 --slots 32 \\
        --claims 20000 --concurrency 64

Each of ``concurrency`` tasks loops: claim a slot (a persona asked for, cached on some workers), release
it. ``claims_per_second`` counts completed cycles (one claim and one release each) per second; latencies
are per operation as the caller sees them (client, network and script); ``server_us_per_script`` is the
time Redis itself spends in each script (INFO commandstats), which bounds what many gateways together
can claim. Keys go under a private
``{pg-bench-…}`` prefix and are deleted afterwards. Prints JSON; ``main()`` also returns it.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import platform
import time
import uuid
from typing import Any

from personagate_common.routing import scripts
from personagate_common.routing.embedded import EmbeddedRouter
from personagate_common.routing.redis_store import RedisRouter
from personagate_common.routing.router import Refusal, Router, WorkerState

TENANTS = 10
WARMUP = 200


def _quantile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


async def measure(router: Router, *, workers: int, slots: int, claims: int, concurrency: int) -> dict[str, Any]:
    """Run the cycles on ``router`` (its workers registered here) and return the figures."""
    for n in range(workers):
        personas = tuple(f"tenant-{t}/main" for t in range(TENANTS) if t % workers == n)
        await router.heartbeat(
            WorkerState(f"bench-w{n}", f"ws://bench-w{n}:8765/v1/sessions", slots, cached_personas=personas),
            ttl_seconds=600,
        )
    claim_ms: list[float] = []
    release_ms: list[float] = []
    refused = 0

    async def cycles(numbers: itertools.count, total: int, record: bool) -> None:
        nonlocal refused
        while (i := next(numbers)) < total:
            tenant = f"tenant-{i % TENANTS}"
            t0 = time.perf_counter()
            try:
                claim = await router.claim(f"bench-{i}", tenant, None, persona_key=f"{tenant}/main")
            except Refusal:
                refused += record
                continue
            t1 = time.perf_counter()
            await router.release(claim.call_id)
            t2 = time.perf_counter()
            if record:
                claim_ms.append((t1 - t0) * 1000)
                release_ms.append((t2 - t1) * 1000)

    warm = itertools.count()
    await asyncio.gather(*(cycles(warm, WARMUP, False) for _ in range(min(concurrency, WARMUP))))
    numbers = itertools.count()
    started = time.perf_counter()
    await asyncio.gather(*(cycles(numbers, claims, True) for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    claim_ms.sort()
    release_ms.sort()
    return {
        "cycles": len(claim_ms),
        "refused": refused,
        "seconds": round(elapsed, 3),
        "claims_per_second": round(len(claim_ms) / elapsed, 1),
        "claim_p50_ms": round(_quantile(claim_ms, 0.50), 3),
        "claim_p99_ms": round(_quantile(claim_ms, 0.99), 3),
        "release_p50_ms": round(_quantile(release_ms, 0.50), 3),
        "release_p99_ms": round(_quantile(release_ms, 0.99), 3),
    }


async def run(
    redis_url: str | None, *, workers: int = 4, slots: int = 32, claims: int = 20000, concurrency: int = 64,
) -> dict[str, Any]:
    params = {"workers": workers, "slots": slots, "claims": claims, "concurrency": concurrency}
    result: dict[str, Any] = {
        "params": params,
        "machine": {"cpus": os.cpu_count(), "processor": _cpu_model(), "python": platform.python_version()},
    }
    if redis_url:
        prefix = "{pg-bench-" + uuid.uuid4().hex[:8] + "}"
        router = RedisRouter(redis_url, prefix=prefix, max_connections=max(8, min(concurrency, 64)))
        try:
            info = await router.client.info("server")
            before = await _script_stats(router)
            figures = await measure(router, **params)
            after = await _script_stats(router)
            calls = after[0] - before[0]
            result["redis"] = {
                "server": f"redis {info.get('redis_version')}",
                "max_connections": router.client.connection_pool.max_connections,
                **figures,
                # time inside Redis per script (claim or release, warm-up included): its own capacity
                "server_us_per_script": round((after[1] - before[1]) / calls, 2) if calls else None,
            }
        finally:
            await router.client.delete(*(f"{prefix}:{name}" for name in scripts.KEY_NAMES))
            await router.close()
    else:
        result["redis"] = "skipped: no redis_url"
    result["embedded"] = await measure(EmbeddedRouter(), **params)
    return result


def main(
    redis_url: str | None = None, *, workers: int = 4, slots: int = 32, claims: int = 20000, concurrency: int = 64,
) -> dict[str, Any]:
    """Benchmark both stores, print the figures as JSON and return them (``personagate bench routing``)."""
    result = asyncio.run(run(redis_url, workers=workers, slots=slots, claims=claims, concurrency=concurrency))
    print(json.dumps(result, indent=2))
    return result


async def _script_stats(router: RedisRouter) -> tuple[int, int]:
    """(calls, microseconds) of EVALSHA on the server so far."""
    stats = (await router.client.info("commandstats")).get("cmdstat_evalsha", {})
    return int(stats.get("calls", 0)), int(stats.get("usec", 0))


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _cli(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m personagate_bench.routing", description=__doc__.split("\n")[0])
    parser.add_argument("--redis-url", help="a Redis to measure (omit: the embedded store only)")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--slots", type=int, default=32, help="slots per worker")
    parser.add_argument("--claims", type=int, default=20000, help="claim + release cycles per store")
    parser.add_argument("--concurrency", type=int, default=64, help="cycles in flight at once")
    args = parser.parse_args(argv)
    main(args.redis_url, workers=args.workers, slots=args.slots, claims=args.claims, concurrency=args.concurrency)


if __name__ == "__main__":
    _cli()
