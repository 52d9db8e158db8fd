"""The routing store in the process: the single-machine default (``personagate up`` needs no Redis).

Same semantics as ``RedisRouter`` step for step (``scripts.py`` is the reference): placements, derived
reservation and tenant counts, the routing index with its stale-entry pruning, sticky drains, call leases,
release tombstones and the reaper. Each operation runs whole under one ``asyncio.Lock`` (and has no await
inside), which is what one Lua script is on Redis. Deadlines use ``time.monotonic()``.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from .metrics import RoutingMetrics
from .router import Claim, HeartbeatResult, ReapResult, Router, WorkerSnapshot, WorkerState

PERSONA_MAX = 64  # persona-cached workers looked at, as in the Redis store


@dataclass
class _Worker:
    url: str
    capacity: int
    deadline: float
    personas: set[str] = field(default_factory=set)
    draining: bool = False
    indexed: bool = False  # in the routing index (Redis: the worker:free ZSET)


class EmbeddedRouter(Router):
    def __init__(
        self,
        *,
        lease_seconds: float = 15.0,
        worker_ttl: float = 6.0,
        retry_after_seconds: float = 5.0,
        metrics: RoutingMetrics | None = None,
    ) -> None:
        super().__init__(
            lease_seconds=lease_seconds, worker_ttl=worker_ttl, retry_after_seconds=retry_after_seconds,
            metrics=metrics,
        )
        self._lock = asyncio.Lock()
        self._fleet: dict[str, _Worker] = {}
        self._placed: dict[str, str] = {}  # call -> worker
        self._tenant_of: dict[str, str] = {}  # call -> tenant
        self._reserved: dict[str, set[str]] = {}  # worker -> calls (dropped when the worker is reaped)
        self._tenant_calls: dict[str, set[str]] = {}  # tenant -> calls
        self._leases: dict[str, float] = {}  # call -> lease deadline
        self._released: dict[str, float] = {}  # call -> until when a heartbeat may not resurrect it

    # -- helpers mirroring the Lua prelude -------------------------------------------------------

    def _live(self, w: str, now: float) -> bool:
        worker = self._fleet.get(w)
        return worker is not None and worker.deadline > now

    def _free(self, w: str) -> int:
        worker = self._fleet.get(w)
        return (worker.capacity if worker else 0) - len(self._reserved.get(w, ()))

    def _cached(self, w: str, persona: str | None) -> bool:
        worker = self._fleet.get(w)
        return persona is not None and worker is not None and persona in worker.personas

    def _place(self, call: str, w: str) -> None:
        self._placed[call] = w
        self._reserved.setdefault(w, set()).add(call)

    def _unplace(self, call: str, w: str) -> None:
        calls = self._reserved.get(w)
        if calls is not None:
            calls.discard(call)
            if not calls:
                del self._reserved[w]

    def _own_tenant(self, call: str, tenant: str | None) -> None:
        if tenant and call not in self._tenant_of:
            self._tenant_of[call] = tenant
            self._tenant_calls.setdefault(tenant, set()).add(call)

    def _pick(self, now: float, persona: str | None, excluded: set[str]) -> tuple[str | None, bool]:
        if persona is not None:
            best, best_free = None, 0
            holders = sorted(w for w, worker in self._fleet.items() if persona in worker.personas)
            for w in holders[:PERSONA_MAX]:
                if w in excluded or not self._fleet[w].indexed:
                    continue
                f = self._free(w)
                if f > best_free and self._live(w, now):
                    best, best_free = w, f
            if best is not None:
                return best, True
        ranked = sorted(
            (w for w, worker in self._fleet.items() if worker.indexed and self._free(w) >= 1),
            key=lambda w: (self._free(w), w), reverse=True,
        )
        for w in ranked:
            if not self._live(w, now):
                self._fleet[w].indexed = False  # stale: pruned, as the claim script does
            elif w not in excluded:
                return w, self._cached(w, persona)
        return None, False

    def _release_call(self, call: str, now: float) -> bool:
        w = self._placed.pop(call, None)
        if w is None:
            return False
        tenant = self._tenant_of.pop(call, None)
        if tenant is not None:
            calls = self._tenant_calls[tenant]
            calls.discard(call)
            if not calls:
                del self._tenant_calls[tenant]
        self._leases.pop(call, None)
        self._unplace(call, w)
        self._released[call] = now + self.lease_seconds
        return True

    def _claim_for(self, call: str, w: str, cached: bool, reused: bool) -> Claim:
        return Claim(
            call_id=call, worker_id=w, url=self._fleet[w].url, tenant=self._tenant_of.get(call, ""),
            persona_cached=cached, reused=reused,
        )

    # -- Router ----------------------------------------------------------------------------------

    async def _heartbeat(self, state: WorkerState, ttl: float) -> HeartbeatResult:
        async with self._lock:
            now = time.monotonic()
            w = state.worker_id
            worker = self._fleet.get(w)
            if worker is None:
                worker = self._fleet[w] = _Worker(state.url, state.capacity, now + ttl)
            # A drain is sticky while the worker lives; one that comes back after its deadline passed
            # (restarted under the same id before a reaper removed it) starts afresh.
            restarted = worker.deadline <= now
            worker.url, worker.capacity, worker.deadline = state.url, state.capacity, now + ttl
            worker.draining = state.draining or (worker.draining and not restarted)
            worker.personas = set(state.cached_personas)
            recovered = []
            for call in state.active_calls:
                at = self._placed.get(call)
                if at is None:
                    if self._released.get(call, 0.0) <= now:
                        self._place(call, w)
                        self._leases[call] = now + self.lease_seconds
                        recovered.append(call)
                elif at == w:
                    self._reserved.setdefault(w, set()).add(call)
            worker.indexed = not worker.draining
            reserved = len(self._reserved.get(w, ()))
            return HeartbeatResult(reserved, state.capacity - reserved, worker.draining, tuple(recovered))

    async def _drain(self, worker_id: str) -> bool:
        async with self._lock:
            worker = self._fleet.get(worker_id)
            if worker is None:
                return False
            worker.draining, worker.indexed = True, False
            return True

    async def _workers(self) -> list[WorkerSnapshot]:
        async with self._lock:
            now = time.monotonic()
            out = []
            for w, worker in self._fleet.items():
                reserved = len(self._reserved.get(w, ()))
                out.append(WorkerSnapshot(
                    worker_id=w, url=worker.url, capacity=worker.capacity, reserved=reserved,
                    free=max(0, worker.capacity - reserved), draining=worker.draining,
                    alive=worker.deadline > now, cached_personas=len(worker.personas),
                ))
            return out

    async def _reap(self) -> ReapResult:
        async with self._lock:
            now = time.monotonic()
            dead = sorted(w for w, worker in self._fleet.items() if worker.deadline <= now)
            orphaned: list[str] = []
            for w in dead:
                orphaned += sorted(self._reserved.pop(w, ()))
                del self._fleet[w]
            expired = sorted(c for c, deadline in self._leases.items() if deadline <= now)
            for call in expired:
                self._release_call(call, now)
            for call in [c for c, until in self._released.items() if until <= now]:
                del self._released[call]
            return ReapResult(tuple(dead), tuple(orphaned), tuple(expired))

    async def _claim(
        self, call_id: str, tenant: str, tenant_limit: int | None, persona_key: str | None,
        exclude: tuple[str, ...],
    ) -> Claim:
        async with self._lock:
            now = time.monotonic()
            excluded = set(exclude)
            at = self._placed.get(call_id)
            if at is not None:
                if at not in excluded and self._live(at, now):
                    self._own_tenant(call_id, tenant)
                    self._leases[call_id] = now + self.lease_seconds
                    return self._claim_for(call_id, at, self._cached(at, persona_key), reused=True)
                excluded.add(at)
                w, cached = self._pick(now, persona_key, excluded)
                if w is None:
                    raise self.no_capacity()
                self._unplace(call_id, at)
                self._place(call_id, w)
                self._own_tenant(call_id, tenant)
                self._leases[call_id] = now + self.lease_seconds
                return self._claim_for(call_id, w, cached, reused=False)
            if tenant_limit is not None and len(self._tenant_calls.get(tenant, ())) >= tenant_limit:
                raise self.tenant_limit(tenant, tenant_limit)
            w, cached = self._pick(now, persona_key, excluded)
            if w is None:
                raise self.no_capacity()
            self._released.pop(call_id, None)
            self._own_tenant(call_id, tenant)
            self._place(call_id, w)
            self._leases[call_id] = now + self.lease_seconds
            return self._claim_for(call_id, w, cached, reused=False)

    async def _renew(self, claims: list[Claim]) -> tuple[str, ...]:
        async with self._lock:
            now = time.monotonic()
            moved = []
            for c in claims:
                at = self._placed.get(c.call_id)
                if at is None:
                    self._released.pop(c.call_id, None)
                    self._place(c.call_id, c.worker_id)
                elif at != c.worker_id:
                    moved.append(c.call_id)
                self._own_tenant(c.call_id, c.tenant)
                self._leases[c.call_id] = now + self.lease_seconds
            return tuple(moved)

    async def _release(self, call_id: str) -> bool:
        async with self._lock:
            return self._release_call(call_id, time.monotonic())

    async def _rehome(
        self, call_id: str, dead_worker_id: str, persona_key: str | None, tenant: str | None,
    ) -> Claim:
        async with self._lock:
            now = time.monotonic()
            at = self._placed.get(call_id)
            if at is not None and at != dead_worker_id and self._live(at, now):
                self._own_tenant(call_id, tenant)
                return self._claim_for(call_id, at, self._cached(at, persona_key), reused=True)
            dead = self._fleet.get(dead_worker_id)
            if dead is not None:
                dead.indexed = False  # suspect until its next heartbeat
            excluded = {dead_worker_id} | ({at} if at else set())
            w, cached = self._pick(now, persona_key, excluded)
            if w is None:
                raise self.no_capacity(f"no live worker other than {dead_worker_id!r} has a free slot")
            if at is not None:
                self._unplace(call_id, at)
            else:
                self._released.pop(call_id, None)
            self._place(call_id, w)
            self._own_tenant(call_id, tenant)
            self._leases[call_id] = now + self.lease_seconds
            return self._claim_for(call_id, w, cached, reused=False)
