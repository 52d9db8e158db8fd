"""Routing metrics. Own registry by default (tests run several routers); pass the gateway's to share one."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

if TYPE_CHECKING:
    from .router import WorkerSnapshot

disable_created_metrics()

# A claim is one Lua script on a nearby Redis (sub-millisecond) or a dict lookup; a second is an outage.
CLAIM_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
CLAIM_RESULTS = ("claimed", "reused", "no_capacity", "tenant_limit", "unavailable")


class RoutingMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.claims = Counter(
            "personagate_routing_claims_total",
            "Slot claims by result: claimed (a slot reserved), reused (a retried claim found its call placed), "
            "no_capacity, tenant_limit (refused), unavailable (the routing store could not be reached).",
            ["result"], registry=r,
        )
        for result in CLAIM_RESULTS:
            self.claims.labels(result=result)
        self.claim_seconds = Histogram(
            "personagate_routing_claim_seconds",
            "Time to claim a slot (or be refused), as the gateway sees it.",
            buckets=CLAIM_BUCKETS, registry=r,
        )
        self.workers_alive = Gauge(
            "personagate_routing_workers_alive",
            "Workers whose heartbeat is current (draining ones included).", registry=r,
        )
        self.slots_free = Gauge(
            "personagate_routing_slots_free",
            "Unreserved slots on live workers that take claims (not draining).", registry=r,
        )
        self.slots_total = Gauge(
            "personagate_routing_slots_total",
            "Slots on live workers (draining ones included).", registry=r,
        )
        self.workers_reaped = Counter(
            "personagate_routing_workers_reaped_total",
            "Workers removed by the reaper after their heartbeat deadline passed.", registry=r,
        )
        self.calls_rehomed = Counter(
            "personagate_routing_calls_rehomed_total",
            "Calls moved off a worker that dropped them to another worker.", registry=r,
        )

    def observe_workers(self, snapshots: Iterable[WorkerSnapshot]) -> None:
        alive = [w for w in snapshots if w.alive]
        self.workers_alive.set(len(alive))
        self.slots_total.set(sum(w.capacity for w in alive))
        self.slots_free.set(sum(w.free for w in alive if not w.draining))
