"""A Redis failover as callers and the load balancer live it: a real `personagate gateway` (SIP and browser calls)
and an echo `personagate worker`, both routing through a real redis-server of this module's own, which the test
kills and brings back.

What it protects: while the routing store cannot be reached the gateway stays *ready* (every gateway sees a Redis
failover at once; were they all to fail /readyz, the load balancer or MetalLB would withdraw the SIP address and
INVITEs would time out instead of being refused), says so in /readyz's details and a gauge, and refuses new calls
itself: a SIP INVITE gets 503 with Retry-After, a browser offer 503 with Retry-After. Once Redis is back, calls are
answered again without restarting anything.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.helpers.caller import call
from tests.helpers.processes import free_port, serve, udp_free_port
from tests.helpers.redis_server import RedisServer, redis_executable
from tests.helpers.stack import OPEN_NUMBER, scrape_metrics
from tests.helpers.wait import until
from tests.helpers.webrtc import PUBLIC, browser, place, tenant_copy

pytest.importorskip("pjsua2")
pytestmark = pytest.mark.e2e  # a redis-server, a worker and a gateway of its own

SLOTS = 2


@contextlib.contextmanager
def redis_stack(folder: Path) -> Iterator[tuple[RedisServer, dict[str, str]]]:
    """A redis-server, an echo worker heartbeating to it and a gateway routing through it (SIP on a free port,
    browser calls on its HTTP port); yields the Redis server and the stack's addresses ({"sip", "http"}) once the
    gateway sees the worker's slots through Redis."""
    redis = RedisServer(redis_executable(), folder)
    redis.start()
    tenants = tenant_copy(folder / "tenants", harbor_always_open=True)  # browser calls at any hour
    env = os.environ | {"NO_TORCH_COMPILE": "1", "PERSONAGATE_WORKER_REDIS_URL": redis.url}
    worker_port, http_port, sip_port = free_port(), free_port(), udp_free_port()
    worker = serve([sys.executable, "-m", "personagate", "worker", "--model", "echo", "--port", str(worker_port),
                    "--slots", str(SLOTS)], f"http://127.0.0.1:{worker_port}/readyz", env=env)
    gateway = serve([sys.executable, "-m", "personagate", "gateway", "--port", str(http_port), "--tenants",
                     str(tenants), "--redis-url", redis.url, "--sip-port", str(sip_port)],
                    f"http://127.0.0.1:{http_port}/readyz", env=env)
    try:
        with worker, gateway:
            http = f"http://127.0.0.1:{http_port}"
            until(lambda: probe(http).get("slots_free") == SLOTS, "the gateway sees the worker's slots through Redis")
            yield redis, {"sip": f"127.0.0.1:{sip_port}", "http": http}
    finally:
        redis.stop()


def probe(http: str) -> dict:
    """The gateway's /readyz, as a load balancer's probe sees it: it must answer 200 whatever Redis does."""
    response = httpx.get(f"{http}/readyz", timeout=5)
    assert response.status_code == 200, f"/readyz answered {response.status_code}: {response.text}"
    return response.json()


async def test_a_redis_outage_keeps_the_gateway_ready_and_refuses_calls_with_503_until_redis_is_back(tmp_path):
    with redis_stack(tmp_path) as (redis, stack):
        http = stack["http"]
        assert probe(http)["routing_store"] == "reachable"
        assert scrape_metrics(http)["personagate_gateway_routing_store_reachable"] == 1

        redis.stop(kill=True)  # as abrupt as a crashed primary
        until(lambda: probe(http)["routing_store"] == "unreachable", "/readyz reports the routing store unreachable")

        report = call(stack, OPEN_NUMBER, "--seconds", "1")
        assert report["status"] == 503 and not report["answered"], report
        assert report["retry_after"] == "5", report  # the router's retry_after_seconds

        async with browser() as caller, httpx.AsyncClient(base_url=http, timeout=30) as client:
            offer = await place(client, caller, *PUBLIC)
        assert offer.status_code == 503, offer.text
        assert offer.headers["retry-after"] == "5" and "routing store" in offer.json()["detail"]

        ready = probe(http)  # still ready after refusing both calls: only the details tell
        assert ready["ready"] is True and ready["routing_store"] == "unreachable" and "reason" not in ready
        metrics = scrape_metrics(http)
        assert metrics["personagate_gateway_routing_store_reachable"] == 0
        assert metrics['personagate_gateway_call_starts_total{result="unavailable"}'] >= 2
        assert metrics['personagate_gateway_sip_invites_total{answer="503"}'] >= 1
        assert metrics['personagate_gateway_webrtc_refusals_total{reason="unavailable"}'] >= 1

        redis.start()  # empty: the worker re-registers on its next heartbeat
        until(lambda: (r := probe(http))["routing_store"] == "reachable" and r["slots_free"] == SLOTS,
              "the store reachable again and the worker's slots back")
        report = call(stack, OPEN_NUMBER, "--seconds", "1")
        assert report["status"] == 200 and report["answered"], report
        assert scrape_metrics(http)["personagate_gateway_routing_store_reachable"] == 1
